//! Requests and responses of the control socket, parsed and formatted without I/O so
//! they can be tested (and fuzzed) on their own.
//!
//! ```text
//! {"id":1,"cmd":"status"}               -> {"id":1,"ok":true,"state":"running",...}
//! {"id":2,"cmd":"shutdown","timeout_s":10}
//! {"cmd":"destroy"} / {"cmd":"pause"} / {"cmd":"resume"}
//! anything else                         -> {"id":..,"ok":false,"error":"..."}
//! ```

use serde_json::{json, Map, Value};

/// Longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest shutdown grace period a request may ask for (a day).
pub const MAX_TIMEOUT_S: f64 = 86_400.0;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Report the VM's state.
    Status,
    /// Ask the guest to stop; destroy it after `timeout_s` (or the default grace).
    Shutdown {
        /// Grace period in seconds, if given.
        timeout_s: Option<f64>,
    },
    /// Stop the VM now.
    Destroy,
    /// Stop running vCPUs until resumed.
    Pause,
    /// Run paused vCPUs again.
    Resume,
    /// Write a checkpoint to `dir`, then resume, or with `stop` end the VM.
    Checkpoint {
        /// The checkpoint directory (created if missing).
        dir: std::path::PathBuf,
        /// Stop the VM once the checkpoint is written.
        stop: bool,
    },
    /// Live-migrate the VM to the `hpcvm receive` at `to`.
    Migrate {
        /// `unix:PATH` or `tcp:HOST:PORT`.
        to: String,
    },
}

/// A parsed request: the client's id (echoed back) and the command.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Any JSON value the client chose; `null` when absent.
    pub id: Value,
    /// The command.
    pub command: Command,
}

/// A request that could not be understood; `id` is echoed when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    /// The client's id, if the line was a JSON object with one.
    pub id: Value,
    /// What is wrong.
    pub error: String,
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    let bad = |id: &Value, error: String| BadRequest {
        id: id.clone(),
        error,
    };
    let value: Value = serde_json::from_slice(line).map_err(|e| BadRequest {
        id: Value::Null,
        error: format!("invalid JSON: {e}"),
    })?;
    let Value::Object(obj) = value else {
        return Err(bad(&Value::Null, "a request must be a JSON object".into()));
    };
    let id = obj.get("id").cloned().unwrap_or(Value::Null);
    // serde_json keeps the last of repeated keys: {"cmd":"status","cmd":"destroy"}
    // would destroy. A repeated key is an error instead.
    if let Err(e) = serde_json::from_slice::<UniqueKeys>(line) {
        let e = e.to_string();
        let what = e.rsplit_once(" at line ").map_or(e.as_str(), |(w, _)| w);
        return Err(bad(&id, what.to_string()));
    }
    let cmd = match obj.get("cmd") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(bad(&id, format!("\"cmd\" must be a string, not {other}"))),
        None => return Err(bad(&id, "missing \"cmd\"".into())),
    };
    let command = match cmd {
        "status" => Command::Status,
        "destroy" => Command::Destroy,
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "shutdown" => Command::Shutdown {
            timeout_s: parse_timeout(&obj).map_err(|e| bad(&id, e))?,
        },
        "checkpoint" => parse_checkpoint(&obj).map_err(|e| bad(&id, e))?,
        "migrate" => match obj.get("to") {
            Some(Value::String(s)) if !s.is_empty() => Command::Migrate { to: s.clone() },
            Some(Value::String(_)) => return Err(bad(&id, "\"to\" must not be empty".into())),
            Some(other) => {
                return Err(bad(&id, format!("\"to\" must be a string, not {other}")))
            }
            None => return Err(bad(&id, "migrate needs \"to\"".into())),
        },
        other => {
            return Err(bad(
                &id,
                format!(
                    "unknown command {:?} (expected status, shutdown, destroy, pause, resume, checkpoint, migrate)",
                    truncate(other, 64)
                ),
            ))
        }
    };
    if let Some(k) = obj.keys().find(|k| !allowed_field(&command, k)) {
        return Err(bad(&id, format!("unknown field {:?}", truncate(k, 64))));
    }
    Ok(Request { id, command })
}

/// `key` may appear in a request for `command`.
fn allowed_field(command: &Command, key: &str) -> bool {
    matches!(
        (command, key),
        (_, "id" | "cmd")
            | (Command::Shutdown { .. }, "timeout_s")
            | (Command::Checkpoint { .. }, "dir" | "stop")
            | (Command::Migrate { .. }, "to")
    )
}

/// A checkpoint request's `dir` (a non-empty string) and `stop` (a boolean).
fn parse_checkpoint(obj: &Map<String, Value>) -> Result<Command, String> {
    let dir = match obj.get("dir") {
        Some(Value::String(s)) if !s.is_empty() => std::path::PathBuf::from(s),
        Some(Value::String(_)) => return Err("\"dir\" must not be empty".into()),
        Some(other) => return Err(format!("\"dir\" must be a string, not {other}")),
        None => return Err("checkpoint needs \"dir\"".into()),
    };
    let stop = match obj.get("stop") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("\"stop\" must be true or false, not {other}")),
    };
    Ok(Command::Checkpoint { dir, stop })
}

/// A JSON object read only to check that no key is repeated.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut seen: Vec<String> = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if seen.contains(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "field {:?} given twice",
                            truncate(&k, 64)
                        )));
                    }
                    seen.push(k);
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_map(Keys)
    }
}

fn parse_timeout(obj: &Map<String, Value>) -> Result<Option<f64>, String> {
    match obj.get("timeout_s") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if (0.0..=MAX_TIMEOUT_S).contains(&t) => Ok(Some(t)),
            _ => Err(format!(
                "\"timeout_s\" must be from 0 to {MAX_TIMEOUT_S} seconds, not {n}"
            )),
        },
        Some(other) => Err(format!("\"timeout_s\" must be a number, not {other}")),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A success response: `fields` (an object) plus `id` and `"ok": true`, as one line.
pub fn ok_line(id: &Value, fields: Value) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("id".into(), id.clone());
    obj.insert("ok".into(), Value::Bool(true));
    if let Value::Object(f) = fields {
        obj.extend(f);
    }
    line(Value::Object(obj))
}

/// An error response line.
pub fn error_line(id: &Value, error: &str) -> Vec<u8> {
    line(json!({"id": id, "ok": false, "error": error}))
}

fn line(v: Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(&v).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    out
}

/// A request line as `hpcvm ctl` sends it.
pub fn request_line(id: u64, command: &Command) -> Vec<u8> {
    let mut v = match command {
        Command::Status => json!({"cmd": "status"}),
        Command::Destroy => json!({"cmd": "destroy"}),
        Command::Pause => json!({"cmd": "pause"}),
        Command::Resume => json!({"cmd": "resume"}),
        Command::Shutdown { timeout_s } => json!({"cmd": "shutdown", "timeout_s": timeout_s}),
        Command::Checkpoint { dir, stop } => {
            json!({"cmd": "checkpoint", "dir": dir.to_string_lossy(), "stop": stop})
        }
        Command::Migrate { to } => json!({"cmd": "migrate", "to": to}),
    };
    v["id"] = json!(id);
    line(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(s: &str) -> String {
        parse_request(s.as_bytes()).unwrap_err().error
    }

    #[test]
    fn parses_every_command_and_echoes_any_id() {
        let r = parse_request(br#"{"id":"job-7","cmd":"status"}"#).unwrap();
        assert_eq!((r.id, r.command), (json!("job-7"), Command::Status));
        let r = parse_request(br#"{"cmd":"shutdown","timeout_s":2.5,"id":[1]}"#).unwrap();
        assert_eq!(
            r.command,
            Command::Shutdown {
                timeout_s: Some(2.5)
            }
        );
        assert_eq!(r.id, json!([1]));
        for (cmd, want) in [
            ("destroy", Command::Destroy),
            ("pause", Command::Pause),
            ("resume", Command::Resume),
            ("shutdown", Command::Shutdown { timeout_s: None }),
        ] {
            let r = parse_request(format!(r#"{{"cmd":"{cmd}"}}"#).as_bytes()).unwrap();
            assert_eq!((r.id, r.command), (Value::Null, want));
        }
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert!(err("{").starts_with("invalid JSON: "));
        assert_eq!(err("[1,2]"), "a request must be a JSON object");
        assert_eq!(err(r#"{"id":1}"#), "missing \"cmd\"");
        assert_eq!(err(r#"{"cmd":5}"#), "\"cmd\" must be a string, not 5");
        assert_eq!(
            err(r#"{"cmd":"reboot"}"#),
            "unknown command \"reboot\" (expected status, shutdown, destroy, pause, resume, checkpoint, migrate)"
        );
        assert_eq!(
            err(r#"{"cmd":"status","force":true}"#),
            "unknown field \"force\""
        );
        assert!(err(r#"{"cmd":"shutdown","timeout_s":-1}"#).contains("from 0 to 86400"));
        assert!(err(r#"{"cmd":"shutdown","timeout_s":"10"}"#).contains("must be a number"));
        assert_eq!(err(r#"{"cmd":"checkpoint"}"#), "checkpoint needs \"dir\"");
        assert!(err(r#"{"cmd":"checkpoint","dir":"/x","stop":1}"#).contains("true or false"));
        assert!(err(r#"{"cmd":"checkpoint","dir":7}"#).contains("must be a string"));
        assert_eq!(err(r#"{"cmd":"migrate"}"#), "migrate needs \"to\"");
        assert!(err(r#"{"cmd":"migrate","to":3}"#).contains("must be a string"));
        assert_eq!(
            err(r#"{"cmd":"migrate","to":"unix:/m","dir":"/x"}"#),
            "unknown field \"dir\""
        );
        assert_eq!(
            err(r#"{"cmd":"status","dir":"/x"}"#),
            "unknown field \"dir\""
        );
        assert_eq!(
            err(r#"{"cmd":"status","cmd":"destroy"}"#),
            "field \"cmd\" given twice"
        );
        assert!(
            err(r#"{"id":1,"cmd":"shutdown","timeout_s":1,"timeout_s":0}"#)
                .starts_with("field \"timeout_s\" given twice")
        );
        let bad = parse_request(br#"{"id":9,"cmd":"nope"}"#).unwrap_err();
        assert_eq!(bad.id, json!(9), "id echoed on errors when readable");
    }

    #[test]
    fn responses_are_single_lines_with_id_and_ok() {
        let l = ok_line(&json!(3), json!({"state": "running"}));
        assert_eq!(l, b"{\"id\":3,\"ok\":true,\"state\":\"running\"}\n");
        let l = error_line(&Value::Null, "bad \"thing\"\nhere");
        assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(back["error"], "bad \"thing\"\nhere");
    }

    #[test]
    fn client_requests_parse_back() {
        for c in [
            Command::Status,
            Command::Destroy,
            Command::Pause,
            Command::Resume,
            Command::Shutdown {
                timeout_s: Some(3.0),
            },
            Command::Shutdown { timeout_s: None },
            Command::Checkpoint {
                dir: "/scratch/ck".into(),
                stop: true,
            },
            Command::Migrate {
                to: "tcp:node7:4444".into(),
            },
        ] {
            let l = request_line(7, &c);
            let r = parse_request(&l[..l.len() - 1]).unwrap();
            assert_eq!((r.id, r.command), (json!(7), c));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn arbitrary_json_objects_never_panic(
            cmd in "[a-z]{0,10}",
            key in "[a-z_]{0,10}",
            n in any::<f64>(),
        ) {
            let line = format!(r#"{{"cmd":"{cmd}","{key}":{}}}"#, if n.is_finite() { n.to_string() } else { "null".into() });
            let _ = parse_request(line.as_bytes());
        }
    }
}
