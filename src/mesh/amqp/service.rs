//! The BFF's own service queue: requests, commands and events other
//! services send the BFF, taken on a lane of their own (bounded in size
//! before anything is parsed, like the other lane), each served in a task
//! of its own (as many as the prefetch lets in) and acknowledged once
//! served; answers go to the caller's reply queue.

use std::sync::Arc;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;

use super::super::lane::{Incoming, Lane};
use super::drops::{DropReason, echoable};
use super::headers::{decode_message, header_table};
use super::{Shared, unavailable};
use crate::mesh::MeshError;
use crate::protocol::{ErrorBody, ErrorName, MeshMessage, MessageType, RawJson, ResponseBody};

/// What arrived on the service lane. A request, command or event is served
/// in a task of its own (as many as the prefetch lets in: each is
/// acknowledged once served); one the BFF cannot read is refused, and the
/// broker dead-letters it.
pub(super) fn take_request(shared: &Arc<Shared>, lane: &Lane, incoming: Incoming<'_>) {
    match incoming {
        Incoming::Delivery {
            properties,
            body,
            tag,
            ..
        } => {
            let msg = match decode_message(&properties, body) {
                Ok(msg) => msg,
                Err(why) => {
                    let what = format!("on the service queue: {why}");
                    shared.drops.drop_message(DropReason::Undecodable, &what);
                    let _ = lane.reject(tag);
                    return;
                }
            };
            let reply_to = properties.reply_to().unwrap_or_default().to_owned();
            let (served, lane) = (shared.clone(), lane.clone());
            shared.tasks.spawn(async move {
                let done = match serve(&served, msg, &reply_to).await {
                    Served::Done => lane.ack(tag),
                    Served::Refused => lane.reject(tag),
                };
                if let Err(e) = done {
                    // The lane ended: the broker hands the message to
                    // the next consumer.
                    tracing::debug!(error = %e, "a served request could not be acknowledged");
                }
            });
        }
        Incoming::TooLarge { size, .. } => shared.drops.drop_message(
            DropReason::TooLarge,
            &format!(
                "a {size}-byte message on the service queue, over limits.max_mesh_message_bytes ({})",
                shared.config.max_message_bytes
            ),
        ),
        Incoming::Returned { .. } => {}
    }
}

/// What became of a message on the service queue.
enum Served {
    Done,
    /// Refused unanswered (its answer could not name it).
    Refused,
}

async fn serve(shared: &Arc<Shared>, msg: MeshMessage, reply_to: &str) -> Served {
    match msg {
        MeshMessage::Request(req) => {
            let correlation_id = req.correlation_id.clone();
            if !echoable(&correlation_id) {
                // Its answer could not name it: nobody would take it.
                let what = "a request whose correlation_id is not 1 to 255 visible characters";
                shared.drops.drop_message(DropReason::BadField, what);
                return Served::Refused;
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
                reply_to,
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
    Served::Done
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
