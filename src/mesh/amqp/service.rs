//! The BFF's own service queue: requests, commands and events other
//! services send the BFF, each served in a task of its own (as many as the
//! prefetch lets in), answered on the caller's reply queue.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::{BasicProperties, Consumer};

use super::drops::{DropReason, echoable};
use super::headers::{decode_delivery, header_table};
use super::{Shared, unavailable};
use crate::mesh::MeshError;
use crate::protocol::{ErrorBody, ErrorName, MeshMessage, MessageType, RawJson, ResponseBody};

pub(super) async fn consume_requests(shared: &Arc<Shared>, consumer: &mut Consumer) {
    while let Some(delivery) = consumer.next().await {
        let Ok(delivery) = delivery else { return };
        let shared2 = shared.clone();
        // The broker delivers at most `prefetch` unacked messages, which
        // bounds these tasks.
        shared
            .tasks
            .spawn(async move { serve_delivery(&shared2, delivery).await });
    }
}

pub(super) async fn serve_delivery(shared: &Arc<Shared>, delivery: Delivery) {
    let msg = match decode_delivery(&delivery) {
        Ok(m) => m,
        Err(why) => {
            let what = format!("on the service queue: {why}");
            shared.drops.drop_message(DropReason::Undecodable, &what);
            let _ = delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
            return;
        }
    };
    match msg {
        MeshMessage::Request(req) => {
            let reply_to = delivery
                .properties
                .reply_to()
                .as_ref()
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default();
            let correlation_id = req.correlation_id.clone();
            if !echoable(&correlation_id) {
                // Its answer could not name it: nobody would take it.
                let what = "a request whose correlation_id is not 1 to 255 visible characters";
                shared.drops.drop_message(DropReason::BadField, what);
                let _ = delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await;
                return;
            }
            let bad_trace = req.trace_id.as_deref().is_some_and(|t| !echoable(t));
            let trace_id = req.trace_id.clone().filter(|_| !bad_trace);
            let context = req.context.clone();
            let outcome = if bad_trace {
                shared.drops.drop_message(
                    DropReason::BadField,
                    "a request whose trace_id is not 1 to 255 visible characters (answered with an error)",
                );
                Err(ErrorBody::gateway(
                    ErrorName::InvalidMessage,
                    "trace_id must be 1 to 255 visible ASCII characters",
                ))
            } else {
                shared.handler.handle_request(req.into()).await
            };
            let (result, error) = match outcome {
                Ok(v) => (RawJson::from(v), None),
                Err(e) => (RawJson::null(), Some(e)),
            };
            let body = MeshMessage::Response(ResponseBody {
                correlation_id: correlation_id.clone(),
                context,
                trace_id: trace_id.clone(),
                result,
                error,
                warning: None,
                reply_to: String::new(),
            });
            if reply_to.is_empty() {
                tracing::debug!("request without reply_to, answered nowhere");
            } else if let Err(e) = publish_response(
                shared,
                &reply_to,
                &correlation_id,
                trace_id.as_deref(),
                &body,
            )
            .await
            {
                tracing::debug!(error = %e, "could not publish a response");
            }
        }
        MeshMessage::Command(cmd) => {
            let _ = shared.handler.handle_request(cmd.into()).await;
        }
        MeshMessage::Event(ev) => {
            shared.handler.handle_event(ev.into()).await;
        }
        MeshMessage::Response(_) => {
            tracing::debug!("a response on the service queue, dropped");
        }
    }
    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
}

pub(super) async fn publish_response(
    shared: &Shared,
    reply_to: &str,
    correlation_id: &str,
    trace_id: Option<&str>,
    body: &MeshMessage,
) -> Result<(), MeshError> {
    let channel = shared.publish_channel()?;
    let payload = serde_json::to_vec(body).map_err(unavailable)?;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id(correlation_id.into())
        .with_headers(header_table(MessageType::Response, trace_id));
    channel
        .basic_publish(
            "".into(),
            reply_to.into(),
            BasicPublishOptions::default(),
            &payload,
            props,
        )
        .await
        .map_err(|e| shared.channel_error(e))?;
    Ok(())
}
