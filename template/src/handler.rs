//! The WebSocket handler hooks of {{project-name}}. Every hook has a
//! default in the runtime; override what this frontend needs.

use nuropb_bff::{BoxFuture, ClientCall, ErrorBody, LocalCall, WsHandler};
use serde_json::{Value, json};

#[derive(Debug, Default)]
pub struct Handler;

impl WsHandler for Handler {
    // fn hello(&self, session: &SessionInfo) -> Value      the `hello` event
    // fn on_request(&self, session, call: &mut Call)       before a mesh call
    // fn on_response(&self, session, call, result: RawJson) -> RawJson
    //                                                      a service's JSON, passed on unparsed
    // fn on_event(&self, topic, event) -> Option<Value>    before a push

    /// BFF-local routes: requests for the service `bff` are answered here
    /// (`local_request`), composing mesh calls on the user's behalf;
    /// everything else goes through routes.toml.
    fn is_local(&self, call: &ClientCall) -> bool {
        call.service == "bff"
    }

    fn local_request(
        &self,
        call: LocalCall,
    ) -> Option<BoxFuture<'static, Result<Value, ErrorBody>>> {
        Some(Box::pin(async move {
            match call.call.method.as_str() {
                "whoami" => Ok(json!({
                    "user_id": call.session.user_id,
                    "username": call.session.username,
                    "roles": call.session.roles,
                })),
                other => Err(ErrorBody::new(
                    "RouteNotFound",
                    format!("bff.{other} is not a local route"),
                )),
            }
        }))
    }
}
