//! Meters every DynamoDB call where the SDK runs it, so no call site can
//! forget: asks DynamoDB to report the capacity each item call consumes
//! (ReturnConsumedCapacity=TOTAL, free of charge), adds it to the capacity
//! counters, and counts the SDK's retries.
//!
//! Installed on the client by [`super::DynamoStore::connect_with`]; a call
//! added later (BatchGetItem) is metered as soon as its input and output
//! types are listed below.

use aws_sdk_dynamodb::config::interceptors::{
    BeforeSerializationInterceptorContextMut, FinalizerInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::operation::batch_get_item::{BatchGetItemInput, BatchGetItemOutput};
use aws_sdk_dynamodb::operation::get_item::{GetItemInput, GetItemOutput};
use aws_sdk_dynamodb::operation::put_item::{PutItemInput, PutItemOutput};
use aws_sdk_dynamodb::operation::transact_write_items::{
    TransactWriteItemsInput, TransactWriteItemsOutput,
};
use aws_sdk_dynamodb::operation::update_item::{UpdateItemInput, UpdateItemOutput};
use aws_sdk_dynamodb::types::{ConsumedCapacity, ReturnConsumedCapacity};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{Input, Output};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::retries::RequestAttempts;

use crate::metrics;

#[derive(Debug)]
pub struct Metering;

impl Intercept for Metering {
    fn name(&self) -> &'static str {
        "dynacache::store::metering"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        ask_for_capacity(context.input_mut());
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg.load::<Metadata>().map_or("unknown", Metadata::name);
        let attempts = cfg.load::<RequestAttempts>().map_or(1, |a| a.attempts());
        if attempts > 1 {
            // Rare, and a DynamoDB call's cost dwarfs the registry lookup.
            ::metrics::counter!(metrics::DYNAMODB_RETRIES, "operation" => operation.to_owned())
                .increment(u64::from(attempts - 1));
        }
        if let Some(Ok(output)) = context.output_or_error()
            && let Some(units) = consumed(output)
        {
            metrics::record_capacity(operation, units);
        }
        Ok(())
    }
}

/// Sets ReturnConsumedCapacity=TOTAL on the item operations, unless the
/// caller chose a level itself.
fn ask_for_capacity(input: &mut Input) {
    let total = ReturnConsumedCapacity::Total;
    let level = if let Some(i) = input.downcast_mut::<GetItemInput>() {
        &mut i.return_consumed_capacity
    } else if let Some(i) = input.downcast_mut::<PutItemInput>() {
        &mut i.return_consumed_capacity
    } else if let Some(i) = input.downcast_mut::<UpdateItemInput>() {
        &mut i.return_consumed_capacity
    } else if let Some(i) = input.downcast_mut::<BatchGetItemInput>() {
        &mut i.return_consumed_capacity
    } else if let Some(i) = input.downcast_mut::<TransactWriteItemsInput>() {
        &mut i.return_consumed_capacity
    } else {
        return;
    };
    level.get_or_insert(total);
}

/// The capacity units a successful call reports having consumed.
fn consumed(output: &Output) -> Option<f64> {
    let one = |c: &Option<ConsumedCapacity>| c.as_ref()?.capacity_units;
    if let Some(o) = output.downcast_ref::<GetItemOutput>() {
        one(&o.consumed_capacity)
    } else if let Some(o) = output.downcast_ref::<PutItemOutput>() {
        one(&o.consumed_capacity)
    } else if let Some(o) = output.downcast_ref::<UpdateItemOutput>() {
        one(&o.consumed_capacity)
    } else if let Some(o) = output.downcast_ref::<BatchGetItemOutput>() {
        // One entry per table.
        let all = o.consumed_capacity.as_ref()?;
        Some(all.iter().filter_map(|c| c.capacity_units).sum())
    } else if let Some(o) = output.downcast_ref::<TransactWriteItemsOutput>() {
        let all = o.consumed_capacity.as_ref()?;
        Some(all.iter().filter_map(|c| c.capacity_units).sum())
    } else {
        None
    }
}
