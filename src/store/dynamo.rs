//! [`DynamoStore`]: items in one DynamoDB table, one item per key.
//!
//! Layout (attribute names configurable): the key as partition key (S or B),
//! the value (B), the flags (N), the expiry in Unix seconds (N, the table's
//! TTL attribute; absent = never) and a version (N) that every write changes.
//! DynamoDB deletes expired items lazily, so every read compares the expiry
//! with the clock itself.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType as DynamoKeyType,
    KeysAndAttributes, ProvisionedThroughput, ReturnValuesOnConditionCheckFailure,
    ScalarAttributeType, TimeToLiveSpecification,
};
use serde::{Deserialize, Serialize};

use super::{Change, Expect, Item, Store, StoreError, View, Written};

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

    /// An item as DynamoDB holds it; a missing attribute takes its default
    /// (items other programs wrote may lack flags or a version). Takes the
    /// attributes by value: the value's bytes move, they are not copied.
    fn item_from(&self, mut attrs: HashMap<String, AttributeValue>) -> Result<Item, StoreError> {
        let s = &self.settings;
        let value = match attrs.remove(&s.value_attribute) {
            Some(AttributeValue::B(b)) => b.into_inner(),
            // Tables written by django-dynamodb-sessions hold strings.
            Some(AttributeValue::S(text)) => text.into_bytes(),
            Some(_) => return Err(bad_attr(&s.value_attribute)),
            None => Vec::new(),
        };
        Ok(Item {
            value,
            flags: number(&attrs, &s.flags_attribute)?.unwrap_or(0),
            expires_at: expiry(&attrs, &s.expiry_attribute)?,
            version: number(&attrs, &s.version_attribute)?.unwrap_or(0),
        })
    }

    fn item_in(
        &self,
        attrs: Option<HashMap<String, AttributeValue>>,
    ) -> Result<Option<Item>, StoreError> {
        match attrs {
            Some(attrs) if !attrs.is_empty() => self.item_from(attrs).map(Some),
            _ => Ok(None),
        }
    }

    /// The condition that the key holds what `expect` says, and its values.
    fn condition(expect: Expect, view: View) -> (String, Vec<(&'static str, AttributeValue)>) {
        match expect {
            Expect::Missing => ("attribute_not_exists(#k)".into(), Vec::new()),
            Expect::Version { version, live } => {
                // An item another program wrote may have no version: it is 0.
                let mut expr = match version {
                    0 => String::from(
                        "attribute_exists(#k) AND (attribute_not_exists(#r) OR #r = :ver)",
                    ),
                    _ => String::from("#r = :ver"),
                };
                let mut values = vec![(":ver", AttributeValue::N(version.to_string()))];
                if live {
                    expr.push_str(" AND (attribute_not_exists(#e) OR #e > :now)");
                    values.push((":now", AttributeValue::N(view.now.to_string())));
                    if view.flushed_before > 0 {
                        expr.push_str(" AND #r >= :flushed");
                        values.push((
                            ":flushed",
                            AttributeValue::N(view.flushed_before.to_string()),
                        ));
                    }
                }
                (expr, values)
            }
        }
    }

    /// Runs one SDK call and records its latency and outcome: the one place
    /// every DynamoDB call is observed.
    async fn send<T, E>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, SdkError<E>>>,
    ) -> Result<T, SdkError<E>>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let started = Instant::now();
        // Boxed: SDK futures are large, and the engine's futures hold them.
        let result = Box::pin(call).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => "conditional_failed",
            Err(e) => match classify(e) {
                StoreError::Timeout => "timeout",
                StoreError::Throttled => "throttled",
                _ => "error",
            },
        };
        metrics::counter!(crate::metrics::DYNAMODB_REQUESTS, "operation" => operation, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(crate::metrics::DYNAMODB_DURATION, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        match outcome {
            "ok" | "conditional_failed" => super::outage::DYNAMODB.answered(),
            _ => {
                if let Err(e) = &result {
                    let error = classify(e);
                    tracing::debug!(operation, %error, detail = %DisplayErrorContext(e), "dynamodb call failed");
                    super::outage::DYNAMODB.failed(&error, &DisplayErrorContext(e).to_string());
                }
            }
        }
        result
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
                    .map_err(|e| StoreError::Rejected(e.to_string()))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(&s.key_attribute)
                    .key_type(DynamoKeyType::Hash)
                    .build()
                    .map_err(|e| StoreError::Rejected(e.to_string()))?,
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
                        .map_err(|e| StoreError::Rejected(e.to_string()))?,
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
            Err(e) => return Err(classify(&e)),
        }
        self.client
            .wait_until_table_exists()
            .table_name(&s.table)
            .wait(Duration::from_secs(120))
            .await
            .map_err(|e| StoreError::Rejected(DisplayErrorContext(&e).to_string()))?;
        Box::pin(
            self.client
                .update_time_to_live()
                .table_name(&s.table)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .enabled(true)
                        .attribute_name(&s.expiry_attribute)
                        .build()
                        .map_err(|e| StoreError::Rejected(e.to_string()))?,
                )
                .send(),
        )
        .await
        .map_err(|e| classify(&e))?;
        Ok(true)
    }

    /// Whether the table exists and answers (for readiness).
    pub async fn describe_table(&self) -> Result<(), StoreError> {
        let call = self
            .client
            .describe_table()
            .table_name(&self.settings.table)
            .send();
        match self.send("DescribeTable", call).await {
            Ok(_) => Ok(()),
            Err(e) => Err(classify(&e)),
        }
    }
}

/// BatchGetItem's limit of keys per call.
const BATCH_GET_MAX: usize = 100;

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

/// What the client is told of an SDK failure: a short, classified reason
/// (the SDK's own text, with HTTP headers, goes to the debug log).
fn classify<E>(err: &SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::TimeoutError(_) => StoreError::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => StoreError::Timeout,
        SdkError::DispatchFailure(_) => StoreError::Unavailable,
        SdkError::ResponseError(_) => StoreError::Unavailable,
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            match code {
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded" => StoreError::Throttled,
                "InternalServerError" | "ServiceUnavailable" | "InternalFailure" => {
                    StoreError::Internal
                }
                _ if service.raw().status().is_server_error() => StoreError::Internal,
                // An AWS error code is a short identifier; bound it anyway.
                _ => StoreError::Rejected(code.chars().take(64).collect()),
            }
        }
        _ => StoreError::Unavailable,
    }
}

/// The item a failed condition returned (ReturnValuesOnConditionCheckFailure).
fn conflict_item<E>(
    err: &SdkError<E>,
    item: impl Fn(&E) -> Option<&HashMap<String, AttributeValue>>,
) -> Option<Option<HashMap<String, AttributeValue>>>
where
    E: ProvideErrorMetadata,
{
    let service = err.as_service_error()?;
    (service.code() == Some("ConditionalCheckFailedException")).then(|| item(service).cloned())
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

    /// One UTF-8 check of the whole list: spaces are ASCII, so a list is
    /// valid UTF-8 exactly when each of its keys is.
    fn check_key_list(&self, keys: &[u8]) -> Result<(), StoreError> {
        self.check_key(keys)
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

    async fn get(&self, key: &[u8]) -> Result<Option<Item>, StoreError> {
        let call = self
            .client
            .get_item()
            .table_name(&self.settings.table)
            .key(&self.settings.key_attribute, self.key_value(key)?)
            .consistent_read(self.settings.consistent_reads)
            .send();
        match self.send("GetItem", call).await {
            Ok(out) => self.item_in(out.item),
            Err(e) => Err(classify(&e)),
        }
    }

    async fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Item>>, StoreError> {
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
                    .map_err(|e| StoreError::Rejected(e.to_string()))?;
                let call = self
                    .client
                    .batch_get_item()
                    .request_items(&s.table, request)
                    .send();
                let mut out = self
                    .send("BatchGetItem", call)
                    .await
                    .map_err(|e| classify(&e))?;
                let found = out
                    .responses
                    .take()
                    .and_then(|mut r| r.remove(&s.table))
                    .unwrap_or_default();
                for attrs in found {
                    let i = match attrs.get(&s.key_attribute) {
                        Some(AttributeValue::S(k)) => index.get(k.as_bytes()),
                        Some(AttributeValue::B(k)) => index.get(k.as_ref()),
                        _ => return Err(bad_attr(&s.key_attribute)),
                    };
                    if let Some(&i) = i {
                        items[i] = self.item_in(Some(attrs))?;
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

    async fn write(
        &self,
        key: &[u8],
        change: Change<'_>,
        expect: Expect,
        view: View,
    ) -> Result<Written, StoreError> {
        let s = &self.settings;
        let (condition, values) = Self::condition(expect, view);
        let returned = match change {
            Change::Put(item) => {
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
                    )
                    .condition_expression(&condition)
                    .set_expression_attribute_names(Some(self.names_for(&condition)))
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    );
                if item.expires_at != 0 {
                    req = req.item(
                        &s.expiry_attribute,
                        AttributeValue::N(item.expires_at.to_string()),
                    );
                }
                for (name, value) in values {
                    req = req.expression_attribute_values(name, value);
                }
                match self.send("PutItem", req.send()).await {
                    Ok(_) => return Ok(Written::Done),
                    Err(e) => conflict_item(&e, |e| match e {
                        PutItemError::ConditionalCheckFailedException(c) => c.item(),
                        _ => None,
                    })
                    .ok_or_else(|| classify(&e))?,
                }
            }
            Change::Retime {
                expires_at,
                version,
            } => {
                let update = match expires_at {
                    0 => "SET #r = :new REMOVE #e",
                    _ => "SET #r = :new, #e = :exp",
                };
                let mut req = self
                    .client
                    .update_item()
                    .table_name(&s.table)
                    .key(&s.key_attribute, self.key_value(key)?)
                    .update_expression(update)
                    .condition_expression(&condition)
                    .set_expression_attribute_names(Some(
                        self.names_for(&format!("{update} {condition}")),
                    ))
                    .expression_attribute_values(":new", AttributeValue::N(version.to_string()))
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    );
                if expires_at != 0 {
                    req = req.expression_attribute_values(
                        ":exp",
                        AttributeValue::N(expires_at.to_string()),
                    );
                }
                for (name, value) in values {
                    req = req.expression_attribute_values(name, value);
                }
                match self.send("UpdateItem", req.send()).await {
                    Ok(_) => return Ok(Written::Done),
                    Err(e) => conflict_item(&e, |e| match e {
                        UpdateItemError::ConditionalCheckFailedException(c) => c.item(),
                        _ => None,
                    })
                    .ok_or_else(|| classify(&e))?,
                }
            }
        };
        Ok(Written::Conflict(self.item_in(returned)?))
    }

    async fn ready(&self) -> Result<(), String> {
        self.describe_table()
            .await
            .map_err(|e| format!("DescribeTable {}: {e}", self.settings.table))
    }
}
