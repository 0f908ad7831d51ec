//! [`DynamoStore`]: items in one DynamoDB table, one item per key.
//!
//! Layout (attribute names configurable): the key as partition key (S or B),
//! the value (B), the flags (N), the expiry in Unix seconds (N, the table's
//! TTL attribute; absent = never) and a version (N) that every write changes.
//! DynamoDB deletes expired items lazily, so every read compares the expiry
//! with the clock itself.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType as DynamoKeyType,
    KeysAndAttributes, ProvisionedThroughput, ReturnValue, ReturnValuesOnConditionCheckFailure,
    ScalarAttributeType, TimeToLiveSpecification,
};
use serde::{Deserialize, Serialize};

use super::{PutCondition, PutResult, Store, StoreError, StoredItem, View};

/// The type of the table's partition key attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    /// String: readable in the console; keys must be valid UTF-8.
    S,
    /// Binary: any key bytes.
    B,
}

/// How to reach the table and how its items are laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamoSettings {
    pub table: String,
    /// Overrides the endpoint (DynamoDB Local); else the AWS chain decides.
    pub endpoint_url: Option<String>,
    /// Overrides the region; else the AWS chain decides.
    pub region: Option<String>,
    pub key_attribute: String,
    pub key_type: KeyType,
    pub value_attribute: String,
    pub flags_attribute: String,
    pub expiry_attribute: String,
    pub version_attribute: String,
    /// Strongly consistent reads on a miss (false halves their read cost).
    pub consistent_reads: bool,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on one operation, retries included.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Attempts per operation, the first included (the SDK's standard retry).
    pub max_attempts: u32,
}

impl Default for DynamoSettings {
    fn default() -> Self {
        DynamoSettings {
            table: "dynacache".into(),
            endpoint_url: None,
            region: None,
            key_attribute: "key".into(),
            key_type: KeyType::S,
            value_attribute: "value".into(),
            flags_attribute: "flags".into(),
            expiry_attribute: "expires_at".into(),
            version_attribute: "version".into(),
            consistent_reads: true,
            connect_timeout: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(3),
            max_attempts: 3,
        }
    }
}

/// How `init-table` creates the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableSettings {
    /// "on_demand" (pay per request) or "provisioned".
    pub billing_mode: TableBilling,
    /// Read capacity units, when provisioned.
    pub read_capacity: i64,
    /// Write capacity units, when provisioned.
    pub write_capacity: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum TableBilling {
    OnDemand,
    Provisioned,
}

impl Default for TableSettings {
    fn default() -> Self {
        TableSettings {
            billing_mode: TableBilling::OnDemand,
            read_capacity: 5,
            write_capacity: 5,
        }
    }
}

pub struct DynamoStore {
    client: Client,
    settings: DynamoSettings,
    /// `#k`, `#v`, ... -> the configured attribute names, for expressions.
    names: HashMap<String, String>,
}

impl DynamoStore {
    /// A client from the standard AWS chain (env, profile, instance role),
    /// with the settings' endpoint, region, timeouts and retries on top.
    pub async fn connect(settings: DynamoSettings) -> DynamoStore {
        DynamoStore::connect_with(settings, |loader| loader).await
    }

    /// [`DynamoStore::connect`], with a last word on the AWS configuration
    /// (tests give DynamoDB Local static credentials this way).
    pub async fn connect_with(
        settings: DynamoSettings,
        customize: impl FnOnce(aws_config::ConfigLoader) -> aws_config::ConfigLoader,
    ) -> DynamoStore {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .operation_timeout(settings.operation_timeout)
                    .build(),
            )
            .retry_config(
                aws_config::retry::RetryConfig::standard().with_max_attempts(settings.max_attempts),
            );
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let region_in_env = ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        match &settings.region {
            Some(region) => loader = loader.region(aws_config::Region::new(region.clone())),
            // DynamoDB Local ignores the region but the SDK needs one to
            // sign; don't go probing instance metadata for it.
            None if settings.endpoint_url.is_some() && !region_in_env => {
                loader = loader.region(aws_config::Region::new("us-east-1"));
            }
            None => {}
        }
        // Boxed: the loader's future is large, and callers nest it in theirs.
        let sdk = Box::pin(customize(loader).load()).await;
        let config = aws_sdk_dynamodb::config::Builder::from(&sdk)
            .interceptor(super::metering::Metering)
            .build();
        DynamoStore::with_client(Client::from_conf(config), settings)
    }

    pub fn with_client(client: Client, settings: DynamoSettings) -> DynamoStore {
        let names = [
            ("#k", &settings.key_attribute),
            ("#v", &settings.value_attribute),
            ("#f", &settings.flags_attribute),
            ("#e", &settings.expiry_attribute),
            ("#r", &settings.version_attribute),
        ]
        .into_iter()
        .map(|(p, n)| (p.to_string(), n.clone()))
        .collect();
        DynamoStore {
            client,
            settings,
            names,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn settings(&self) -> &DynamoSettings {
        &self.settings
    }

    /// Only the placeholders an expression uses may be sent.
    fn names_for(&self, expression: &str) -> HashMap<String, String> {
        self.names
            .iter()
            .filter(|(p, _)| expression.contains(p.as_str()))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect()
    }

    fn key_value(&self, key: &[u8]) -> Result<AttributeValue, StoreError> {
        match self.settings.key_type {
            KeyType::B => Ok(AttributeValue::B(Blob::new(key))),
            KeyType::S => std::str::from_utf8(key)
                .map(|s| AttributeValue::S(s.to_owned()))
                .map_err(|_| StoreError::InvalidKey(NOT_UTF8)),
        }
    }

    fn item_from(&self, attrs: &HashMap<String, AttributeValue>) -> Result<StoredItem, StoreError> {
        let s = &self.settings;
        let value = match attrs.get(&s.value_attribute) {
            Some(AttributeValue::B(b)) => b.as_ref().to_vec(),
            // Tables written by django-dynamodb-sessions hold strings.
            Some(AttributeValue::S(text)) => text.as_bytes().to_vec(),
            Some(_) => return Err(bad_attr(&s.value_attribute)),
            None => Vec::new(),
        };
        Ok(StoredItem {
            value,
            flags: number(attrs, &s.flags_attribute)?.unwrap_or(0),
            expires_at: expiry(attrs, &s.expiry_attribute)?,
            version: number(attrs, &s.version_attribute)?.unwrap_or(0),
        })
    }

    fn live_item(
        &self,
        attrs: Option<&HashMap<String, AttributeValue>>,
        view: View,
    ) -> Result<Option<StoredItem>, StoreError> {
        match attrs {
            Some(attrs) if !attrs.is_empty() => {
                let item = self.item_from(attrs)?;
                Ok(item.is_live(view).then_some(item))
            }
            _ => Ok(None),
        }
    }

    /// The condition under which the key holds a live item, and its values.
    fn live_condition(view: View) -> (String, Vec<(&'static str, AttributeValue)>) {
        let mut expr =
            String::from("attribute_exists(#k) AND (attribute_not_exists(#e) OR #e > :now)");
        let mut values = vec![(":now", AttributeValue::N(view.now.to_string()))];
        if view.flushed_before > 0 {
            expr.push_str(" AND #r >= :flushed");
            values.push((
                ":flushed",
                AttributeValue::N(view.flushed_before.to_string()),
            ));
        }
        (expr, values)
    }

    /// The marker item's key: a space, which no memcached key can hold.
    fn flush_marker_key(&self) -> AttributeValue {
        match self.settings.key_type {
            KeyType::S => AttributeValue::S(FLUSH_MARKER_KEY.into()),
            KeyType::B => AttributeValue::B(Blob::new(FLUSH_MARKER_KEY)),
        }
    }

    /// Creates the table (partition key only, TTL on the expiry attribute).
    /// Returns false, changing nothing, when it already exists.
    pub async fn create_table(&self, table: &TableSettings) -> Result<bool, StoreError> {
        let s = &self.settings;
        let key_type = match s.key_type {
            KeyType::S => ScalarAttributeType::S,
            KeyType::B => ScalarAttributeType::B,
        };
        let mut req = self
            .client
            .create_table()
            .table_name(&s.table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(&s.key_attribute)
                    .attribute_type(key_type)
                    .build()
                    .map_err(|e| StoreError::Service(e.to_string()))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(&s.key_attribute)
                    .key_type(DynamoKeyType::Hash)
                    .build()
                    .map_err(|e| StoreError::Service(e.to_string()))?,
            );
        req = match table.billing_mode {
            TableBilling::OnDemand => req.billing_mode(BillingMode::PayPerRequest),
            TableBilling::Provisioned => req
                .billing_mode(BillingMode::Provisioned)
                .provisioned_throughput(
                    ProvisionedThroughput::builder()
                        .read_capacity_units(table.read_capacity)
                        .write_capacity_units(table.write_capacity)
                        .build()
                        .map_err(|e| StoreError::Service(e.to_string()))?,
                ),
        };
        match Box::pin(req.send()).await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(classify(e)),
        }
        self.client
            .wait_until_table_exists()
            .table_name(&s.table)
            .wait(Duration::from_secs(120))
            .await
            .map_err(|e| StoreError::Service(DisplayErrorContext(&e).to_string()))?;
        Box::pin(
            self.client
                .update_time_to_live()
                .table_name(&s.table)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .enabled(true)
                        .attribute_name(&s.expiry_attribute)
                        .build()
                        .map_err(|e| StoreError::Service(e.to_string()))?,
                )
                .send(),
        )
        .await
        .map_err(classify)?;
        Ok(true)
    }

    /// Whether the table exists and answers (for readiness).
    pub async fn describe_table(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = Box::pin(
            self.client
                .describe_table()
                .table_name(&self.settings.table)
                .send(),
        )
        .await;
        match result {
            Ok(_) => {
                observe("DescribeTable", started, "ok");
                Ok(())
            }
            Err(e) => {
                let err = classify(e);
                observe("DescribeTable", started, outcome_of(&err));
                Err(err)
            }
        }
    }
}

/// BatchGetItem's limit of keys per call.
const BATCH_GET_MAX: usize = 100;

/// The key of the item recording the last `flush_all`.
const FLUSH_MARKER_KEY: &str = "dynacache flush_all";

const NOT_UTF8: &str = "key is not valid UTF-8, which the table's S key attribute requires";

fn bad_attr(name: &str) -> StoreError {
    StoreError::BadItem(format!("attribute {name} has the wrong type"))
}

fn number<T: std::str::FromStr>(
    attrs: &HashMap<String, AttributeValue>,
    name: &str,
) -> Result<Option<T>, StoreError> {
    match attrs.get(name) {
        None => Ok(None),
        Some(AttributeValue::N(n)) => n.parse().map(Some).map_err(|_| bad_attr(name)),
        Some(_) => Err(bad_attr(name)),
    }
}

/// The expiry attribute as whole seconds (DynamoDB numbers may carry a
/// fraction); absent means never.
fn expiry(attrs: &HashMap<String, AttributeValue>, name: &str) -> Result<u32, StoreError> {
    match number::<f64>(attrs, name)? {
        None => Ok(0),
        Some(secs) if secs <= 0.0 => Ok(1), // already expired
        Some(secs) => Ok(secs.ceil().min(f64::from(u32::MAX)) as u32),
    }
}

/// Maps an SDK failure to what the client is told, and notes it for the
/// outage log.
fn classify<E>(err: SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let err = classify_only(err);
    super::outage::DYNAMODB.failed(&err);
    err
}

fn classify_only<E>(err: SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::TimeoutError(_) => StoreError::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => StoreError::Timeout,
        SdkError::DispatchFailure(_) => {
            StoreError::Unavailable(DisplayErrorContext(&err).to_string())
        }
        SdkError::ServiceError(service) => match service.err().code() {
            Some(
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded",
            ) => StoreError::Throttled,
            code => StoreError::Service(format!(
                "{}: {}",
                code.unwrap_or("unknown"),
                service.err().message().unwrap_or("no message")
            )),
        },
        _ => StoreError::Service(DisplayErrorContext(&err).to_string()),
    }
}

/// Records one DynamoDB call's outcome and latency.
fn observe(operation: &'static str, started: Instant, outcome: &'static str) {
    metrics::counter!(crate::metrics::DYNAMODB_REQUESTS, "operation" => operation, "outcome" => outcome)
        .increment(1);
    metrics::histogram!(crate::metrics::DYNAMODB_DURATION, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    if matches!(outcome, "ok" | "conditional_failed") {
        super::outage::DYNAMODB.answered();
    }
}

fn outcome_of(err: &StoreError) -> &'static str {
    match err {
        StoreError::Timeout => "timeout",
        StoreError::Throttled => "throttled",
        _ => "error",
    }
}

impl Store for DynamoStore {
    fn check_key(&self, key: &[u8]) -> Result<(), StoreError> {
        match self.settings.key_type {
            KeyType::S if std::str::from_utf8(key).is_err() => {
                Err(StoreError::InvalidKey(NOT_UTF8))
            }
            _ => Ok(()),
        }
    }

    fn item_overhead(&self) -> usize {
        let s = &self.settings;
        // Attribute names count toward the 400 KB item limit; numbers take
        // at most 21 bytes each.
        s.key_attribute.len()
            + s.value_attribute.len()
            + s.flags_attribute.len()
            + s.expiry_attribute.len()
            + s.version_attribute.len()
            + 3 * 21
    }

    async fn get(&self, key: &[u8], view: View) -> Result<Option<StoredItem>, StoreError> {
        let started = Instant::now();
        let result = Box::pin(
            self.client
                .get_item()
                .table_name(&self.settings.table)
                .key(&self.settings.key_attribute, self.key_value(key)?)
                .consistent_read(self.settings.consistent_reads)
                .send(),
        )
        .await;
        match result {
            Ok(out) => {
                observe("GetItem", started, "ok");
                self.live_item(out.item(), view)
            }
            Err(e) => {
                let err = classify(e);
                observe("GetItem", started, outcome_of(&err));
                Err(err)
            }
        }
    }

    async fn get_many(
        &self,
        keys: &[&[u8]],
        view: View,
    ) -> Result<Vec<Option<StoredItem>>, StoreError> {
        let s = &self.settings;
        let index: HashMap<&[u8], usize> = keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        let mut items = vec![None; keys.len()];
        // Unprocessed keys (DynamoDB's partial answers under load) are retried
        // with backoff, within the same bound as any one operation.
        let deadline = Instant::now() + s.operation_timeout;
        for chunk in keys.chunks(BATCH_GET_MAX) {
            let mut pending = chunk
                .iter()
                .map(|k| {
                    Ok(HashMap::from([(
                        s.key_attribute.clone(),
                        self.key_value(k)?,
                    )]))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let mut backoff = Duration::from_millis(20);
            loop {
                metrics::histogram!(crate::metrics::DYNAMODB_BATCH_KEYS)
                    .record(pending.len() as f64);
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(pending))
                    .consistent_read(s.consistent_reads)
                    .build()
                    .map_err(|e| StoreError::Service(e.to_string()))?;
                let started = Instant::now();
                let sent = self
                    .client
                    .batch_get_item()
                    .request_items(&s.table, request)
                    .send();
                let out = match Box::pin(sent).await {
                    Ok(out) => out,
                    Err(e) => {
                        let err = classify(e);
                        observe("BatchGetItem", started, outcome_of(&err));
                        return Err(err);
                    }
                };
                observe("BatchGetItem", started, "ok");
                for attrs in out
                    .responses()
                    .and_then(|r| r.get(&s.table))
                    .into_iter()
                    .flatten()
                {
                    let key = match attrs.get(&s.key_attribute) {
                        Some(AttributeValue::S(k)) => k.as_bytes(),
                        Some(AttributeValue::B(k)) => k.as_ref(),
                        _ => return Err(bad_attr(&s.key_attribute)),
                    };
                    if let Some(&i) = index.get(key) {
                        items[i] = self.live_item(Some(attrs), view)?;
                    }
                }
                pending = out
                    .unprocessed_keys()
                    .and_then(|u| u.get(&s.table))
                    .map(|k| k.keys().to_vec())
                    .unwrap_or_default();
                if pending.is_empty() {
                    break;
                }
                if Instant::now() + backoff > deadline {
                    return Err(StoreError::Throttled);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        Ok(items)
    }

    async fn put(
        &self,
        key: &[u8],
        item: &StoredItem,
        condition: PutCondition,
        view: View,
    ) -> Result<PutResult, StoreError> {
        let s = &self.settings;
        let mut req = self
            .client
            .put_item()
            .table_name(&s.table)
            .item(&s.key_attribute, self.key_value(key)?)
            .item(
                &s.value_attribute,
                AttributeValue::B(Blob::new(item.value.clone())),
            )
            .item(
                &s.flags_attribute,
                AttributeValue::N(item.flags.to_string()),
            )
            .item(
                &s.version_attribute,
                AttributeValue::N(item.version.to_string()),
            );
        if item.expires_at != 0 {
            req = req.item(
                &s.expiry_attribute,
                AttributeValue::N(item.expires_at.to_string()),
            );
        }
        let (live, mut values) = Self::live_condition(view);
        let expr = match condition {
            PutCondition::Always => None,
            // Absent, or present but expired (not yet swept by TTL) or flushed.
            PutCondition::Absent => Some(format!("NOT ({live})")),
            PutCondition::Live => Some(live),
            PutCondition::Version(v) => {
                values.push((":ver", AttributeValue::N(v.to_string())));
                Some(format!("#r = :ver AND {live}"))
            }
        };
        if let Some(expr) = &expr {
            req = req
                .condition_expression(expr)
                .set_expression_attribute_names(Some(self.names_for(expr)))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            for (name, value) in values {
                req = req.expression_attribute_values(name, value);
            }
        }
        let started = Instant::now();
        match Box::pin(req.send()).await {
            Ok(_) => {
                observe("PutItem", started, "ok");
                Ok(PutResult::Stored)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                observe("PutItem", started, "conditional_failed");
                // The item as it was when the condition failed, at no read cost.
                let old = e.as_service_error().and_then(|e| match e {
                    aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) => {
                        c.item().cloned()
                    }
                    _ => None,
                });
                Ok(PutResult::Failed {
                    current: self.live_item(old.as_ref(), view)?,
                })
            }
            Err(e) => {
                let err = classify(e);
                observe("PutItem", started, outcome_of(&err));
                Err(err)
            }
        }
    }

    async fn delete(&self, key: &[u8], view: View) -> Result<bool, StoreError> {
        let started = Instant::now();
        let result = Box::pin(
            self.client
                .delete_item()
                .table_name(&self.settings.table)
                .key(&self.settings.key_attribute, self.key_value(key)?)
                .return_values(ReturnValue::AllOld)
                .send(),
        )
        .await;
        match result {
            Ok(out) => {
                observe("DeleteItem", started, "ok");
                Ok(self.live_item(out.attributes(), view)?.is_some())
            }
            Err(e) => {
                let err = classify(e);
                observe("DeleteItem", started, outcome_of(&err));
                Err(err)
            }
        }
    }

    async fn touch(
        &self,
        key: &[u8],
        expires_at: u32,
        view: View,
    ) -> Result<Option<StoredItem>, StoreError> {
        let update = if expires_at == 0 {
            "REMOVE #e"
        } else {
            "SET #e = :exp"
        };
        let (condition, values) = Self::live_condition(view);
        let mut req = self
            .client
            .update_item()
            .table_name(&self.settings.table)
            .key(&self.settings.key_attribute, self.key_value(key)?)
            .update_expression(update)
            .condition_expression(&condition)
            .set_expression_attribute_names(Some(self.names_for(&format!("{update} {condition}"))))
            .return_values(ReturnValue::AllNew);
        for (name, value) in values {
            req = req.expression_attribute_values(name, value);
        }
        if expires_at != 0 {
            req =
                req.expression_attribute_values(":exp", AttributeValue::N(expires_at.to_string()));
        }
        let started = Instant::now();
        match Box::pin(req.send()).await {
            Ok(out) => {
                observe("UpdateItem", started, "ok");
                // As it now is, even if the new expiry is already past.
                out.attributes()
                    .filter(|attrs| !attrs.is_empty())
                    .map(|attrs| self.item_from(attrs))
                    .transpose()
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                observe("UpdateItem", started, "conditional_failed");
                Ok(None)
            }
            Err(e) => {
                let err = classify(e);
                observe("UpdateItem", started, outcome_of(&err));
                Err(err)
            }
        }
    }

    async fn flush_marker(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        let sent = self
            .client
            .get_item()
            .table_name(&self.settings.table)
            .key(&self.settings.key_attribute, self.flush_marker_key())
            .consistent_read(true)
            .send();
        match Box::pin(sent).await {
            Ok(out) => {
                observe("GetItem", started, "ok");
                match out.item() {
                    Some(attrs) => {
                        Ok(number(attrs, &self.settings.version_attribute)?.unwrap_or(0))
                    }
                    None => Ok(0),
                }
            }
            Err(e) => {
                let err = classify(e);
                observe("GetItem", started, outcome_of(&err));
                Err(err)
            }
        }
    }

    async fn set_flush_marker(&self, flushed_before: u64) -> Result<(), StoreError> {
        // Only forward: of two racing flushes, the later time stays.
        let expr = "attribute_not_exists(#r) OR #r < :flushed";
        let sent = self
            .client
            .put_item()
            .table_name(&self.settings.table)
            .item(&self.settings.key_attribute, self.flush_marker_key())
            .item(
                &self.settings.version_attribute,
                AttributeValue::N(flushed_before.to_string()),
            )
            .condition_expression(expr)
            .set_expression_attribute_names(Some(self.names_for(expr)))
            .expression_attribute_values(":flushed", AttributeValue::N(flushed_before.to_string()))
            .send();
        let started = Instant::now();
        match Box::pin(sent).await {
            Ok(_) => {
                observe("PutItem", started, "ok");
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                observe("PutItem", started, "conditional_failed");
                Ok(())
            }
            Err(e) => {
                let err = classify(e);
                observe("PutItem", started, outcome_of(&err));
                Err(err)
            }
        }
    }
}
