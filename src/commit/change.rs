//! `--change` instructions in Dockerfile syntax, as `docker commit -c`
//! accepts them: `CMD`, `ENTRYPOINT`, `ENV`, `EXPOSE`, `LABEL`, `USER`,
//! `WORKDIR`, `VOLUME`, `STOPSIGNAL`, `ONBUILD`. `CMD`, `ENTRYPOINT` and
//! `VOLUME` take the JSON form (`["a","b"]`) or the shell form (`CMD echo
//! hi` runs `/bin/sh -c "echo hi"`). Parsing gives a [`Change`] (data);
//! [`Change::apply`] edits the image config's `config` object.

use serde_json::{json, Map, Value};

/// A `--change` that could not be parsed; the message names it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--change {text:?}: {reason}")]
pub struct ChangeError {
    /// The instruction as given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One parsed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `CMD`.
    Cmd(Vec<String>),
    /// `ENTRYPOINT`.
    Entrypoint(Vec<String>),
    /// `ENV k=v …`.
    Env(Vec<(String, String)>),
    /// `EXPOSE 80 53/udp`, as `80/tcp` keys.
    Expose(Vec<String>),
    /// `LABEL k=v …`.
    Label(Vec<(String, String)>),
    /// `USER`.
    User(String),
    /// `WORKDIR`.
    Workdir(String),
    /// `VOLUME`.
    Volume(Vec<String>),
    /// `STOPSIGNAL`.
    StopSignal(String),
    /// `ONBUILD`, the trigger as written.
    Onbuild(String),
}

const INSTRUCTIONS: &str = "CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, WORKDIR, VOLUME, \
                            STOPSIGNAL, ONBUILD";

impl Change {
    /// Parses one instruction.
    pub fn parse(text: &str) -> Result<Change, ChangeError> {
        let err = |reason: String| ChangeError { text: text.to_string(), reason };
        let trimmed = text.trim();
        let (word, rest) = trimmed.split_once(char::is_whitespace).unwrap_or((trimmed, ""));
        let rest = rest.trim();
        let instruction = word.to_ascii_uppercase();
        let need_args = |what: &str| {
            if rest.is_empty() {
                Err(err(format!("{what} needs an argument")))
            } else {
                Ok(())
            }
        };
        let change = match instruction.as_str() {
            "CMD" | "ENTRYPOINT" => {
                need_args(&instruction)?;
                let argv = match json_array(rest) {
                    Some(r) => r.map_err(|e| err(format!("{instruction}: {e}")))?,
                    None => vec!["/bin/sh".into(), "-c".into(), rest.into()],
                };
                if instruction == "CMD" {
                    Change::Cmd(argv)
                } else {
                    Change::Entrypoint(argv)
                }
            }
            "ENV" | "LABEL" => {
                need_args(&instruction)?;
                let pairs = key_values(rest).map_err(|e| err(format!("{instruction}: {e}")))?;
                if instruction == "ENV" {
                    Change::Env(pairs)
                } else {
                    Change::Label(pairs)
                }
            }
            "EXPOSE" => {
                need_args("EXPOSE")?;
                let mut ports = Vec::new();
                for p in rest.split_whitespace() {
                    let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                    let proto = proto.to_ascii_lowercase();
                    let ok_port = port.split_once('-').map_or_else(
                        || port.parse::<u16>().is_ok(),
                        |(a, b)| a.parse::<u16>().is_ok() && b.parse::<u16>().is_ok(),
                    );
                    if !ok_port || !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
                        return Err(err(format!("EXPOSE: invalid port {p:?}")));
                    }
                    ports.push(format!("{port}/{proto}"));
                }
                Change::Expose(ports)
            }
            "USER" => {
                need_args("USER")?;
                Change::User(rest.to_string())
            }
            "WORKDIR" => {
                need_args("WORKDIR")?;
                Change::Workdir(rest.to_string())
            }
            "VOLUME" => {
                need_args("VOLUME")?;
                let volumes = match json_array(rest) {
                    Some(r) => r.map_err(|e| err(format!("VOLUME: {e}")))?,
                    None => rest.split_whitespace().map(String::from).collect(),
                };
                Change::Volume(volumes)
            }
            "STOPSIGNAL" => {
                need_args("STOPSIGNAL")?;
                Change::StopSignal(rest.to_string())
            }
            "ONBUILD" => {
                need_args("ONBUILD")?;
                let (inner, _) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                if ["ONBUILD", "FROM", "MAINTAINER"].contains(&inner.to_ascii_uppercase().as_str())
                {
                    return Err(err(format!("ONBUILD: {inner} is not allowed as a trigger")));
                }
                Change::Onbuild(rest.to_string())
            }
            "" => return Err(err("empty instruction".into())),
            other => {
                return Err(err(format!(
                    "{other} is not an instruction commit can change (one of {INSTRUCTIONS})"
                )))
            }
        };
        Ok(change)
    }

    /// Applies the change to a config's `config` object.
    pub fn apply(&self, config: &mut Map<String, Value>) {
        fn object<'a>(config: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
            let slot = config.entry(key).or_insert_with(|| json!({}));
            if !slot.is_object() {
                *slot = json!({});
            }
            slot.as_object_mut().expect("just made an object")
        }
        match self {
            Change::Cmd(argv) => {
                config.insert("Cmd".into(), json!(argv));
            }
            Change::Entrypoint(argv) => {
                config.insert("Entrypoint".into(), json!(argv));
                // As in a Dockerfile, a new ENTRYPOINT resets an inherited CMD.
                config.remove("Cmd");
            }
            Change::Env(pairs) => {
                let mut env: Vec<String> = config
                    .get("Env")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                for (k, v) in pairs {
                    let line = format!("{k}={v}");
                    match env.iter_mut().find(|e| e.split('=').next() == Some(k)) {
                        Some(e) => *e = line,
                        None => env.push(line),
                    }
                }
                config.insert("Env".into(), json!(env));
            }
            Change::Expose(ports) => {
                let map = object(config, "ExposedPorts");
                for p in ports {
                    map.insert(p.clone(), json!({}));
                }
            }
            Change::Label(pairs) => {
                let map = object(config, "Labels");
                for (k, v) in pairs {
                    map.insert(k.clone(), json!(v));
                }
            }
            Change::User(u) => {
                config.insert("User".into(), json!(u));
            }
            Change::Workdir(dir) => {
                let previous = config.get("WorkingDir").and_then(Value::as_str).unwrap_or("/");
                let dir = if dir.starts_with('/') {
                    dir.clone()
                } else {
                    format!("{}/{dir}", previous.trim_end_matches('/'))
                };
                config.insert("WorkingDir".into(), json!(dir));
            }
            Change::Volume(volumes) => {
                let map = object(config, "Volumes");
                for v in volumes {
                    map.insert(v.clone(), json!({}));
                }
            }
            Change::StopSignal(s) => {
                config.insert("StopSignal".into(), json!(s));
            }
            Change::Onbuild(trigger) => {
                let list = config.entry("OnBuild").or_insert_with(|| json!([]));
                if !list.is_array() {
                    *list = json!([]);
                }
                list.as_array_mut().expect("just made an array").push(json!(trigger));
            }
        }
    }
}

/// The JSON form, if `s` looks like one (`[…]`): its strings.
fn json_array(s: &str) -> Option<Result<Vec<String>, String>> {
    if !s.starts_with('[') {
        return None;
    }
    Some(
        serde_json::from_str::<Vec<String>>(s)
            .map_err(|e| format!("not a JSON array of strings: {e}")),
    )
}

/// `k=v k2="v 2"`, or the legacy single pair `k v w` (= `k="v w"`).
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let words = split_words(s)?;
    let first_has_eq = words.first().is_some_and(|w| w.contains('='));
    if !first_has_eq {
        let (key, value) = s.split_once(char::is_whitespace).ok_or("needs a value")?;
        return Ok(vec![(key.to_string(), value.trim().to_string())]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some(("", _)) => Err(format!("{w:?} has an empty name")),
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(format!("{w:?} is not NAME=VALUE")),
        })
        .collect()
}

/// Splits on whitespace, honouring double and single quotes and `\` escapes.
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (q, '\\') if q != Some('\'') => {
                current.push(chars.next().ok_or("ends with a backslash")?);
                in_word = true;
            }
            (_, c) => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if in_word {
        words.push(current);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(changes: &[&str]) -> Value {
        let mut config = Map::new();
        config.insert("Cmd".into(), json!(["old"]));
        config.insert("Env".into(), json!(["PATH=/bin", "A=1"]));
        for c in changes {
            Change::parse(c).unwrap().apply(&mut config);
        }
        Value::Object(config)
    }

    #[test]
    fn json_and_shell_forms() {
        assert_eq!(
            Change::parse(r#"CMD ["nginx", "-g", "daemon off;"]"#).unwrap(),
            Change::Cmd(vec!["nginx".into(), "-g".into(), "daemon off;".into()])
        );
        assert_eq!(
            Change::parse("cmd echo hi there").unwrap(),
            Change::Cmd(vec!["/bin/sh".into(), "-c".into(), "echo hi there".into()])
        );
        assert_eq!(
            Change::parse("VOLUME /a /b").unwrap(),
            Change::Volume(vec!["/a".into(), "/b".into()])
        );
        assert_eq!(
            Change::parse(r#"VOLUME ["/data"]"#).unwrap(),
            Change::Volume(vec!["/data".into()])
        );
    }

    #[test]
    fn env_label_expose_and_friends() {
        let c = applied(&[
            r#"ENV A=2 B="two words" C=x\ y"#,
            "ENV LEGACY some value",
            r#"LABEL org.example="yes" b=1"#,
            "EXPOSE 80 53/udp 8000-8010",
            "USER nobody:nogroup",
            "WORKDIR /srv",
            "WORKDIR app",
            "STOPSIGNAL SIGTERM",
            "ONBUILD RUN make",
            r#"ENTRYPOINT ["/init"]"#,
        ]);
        assert_eq!(
            c["Env"],
            json!(["PATH=/bin", "A=2", "B=two words", "C=x y", "LEGACY=some value"])
        );
        assert_eq!(c["Labels"], json!({"org.example": "yes", "b": "1"}));
        assert_eq!(c["ExposedPorts"], json!({"80/tcp": {}, "53/udp": {}, "8000-8010/tcp": {}}));
        assert_eq!(c["User"], json!("nobody:nogroup"));
        assert_eq!(c["WorkingDir"], json!("/srv/app"));
        assert_eq!(c["StopSignal"], json!("SIGTERM"));
        assert_eq!(c["OnBuild"], json!(["RUN make"]));
        assert_eq!(c["Entrypoint"], json!(["/init"]));
        assert!(c.get("Cmd").is_none());
    }

    #[test]
    fn errors_name_the_instruction() {
        for (text, needle) in [
            ("RUN make", "RUN is not an instruction"),
            ("FROM scratch", "FROM is not an instruction"),
            ("CMD", "CMD needs an argument"),
            (r#"CMD ["unterminated"#, "CMD: not a JSON array"),
            ("EXPOSE 99999", "EXPOSE: invalid port"),
            ("EXPOSE 80/foo", "EXPOSE: invalid port"),
            (r#"ENV A="open"#, "ENV: unterminated quote"),
            ("ENV =x", "ENV: \"=x\" has an empty name"),
            ("LABEL a=1 b", "LABEL: \"b\" is not NAME=VALUE"),
            ("ONBUILD ONBUILD RUN x", "ONBUILD: ONBUILD is not allowed"),
            ("", "empty instruction"),
        ] {
            let e = Change::parse(text).unwrap_err();
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(e.to_string().contains(&format!("{text:?}")), "{e}");
        }
    }
}
