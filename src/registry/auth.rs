//! Registry authentication as Docker does it. A request goes out with the
//! best header we have; a `401` carries a `WWW-Authenticate` challenge that
//! says which scheme the registry wants:
//!
//! - `Basic`: the user's credentials on every request;
//! - `Bearer realm=…,service=…`: a token from the realm for the request's
//!   scope (`repository:team/app:pull` or `…:pull,push`), anonymous when we
//!   have no credentials. Tokens are cached per host and scope and fetched
//!   again shortly before they expire, so a long pull (or a lazy read hours
//!   after mounting) never sends a stale one; a token the registry refuses
//!   anyway is dropped and fetched once more.
//!
//! Credentials are looked up once per host (helpers are programs) and never
//! logged.

use super::credentials::{AuthFile, Credential};
use super::transport::Transport;
use super::{error_message, RegistryError};
use base64::Engine as _;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a registry wants to be authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Challenge {
    /// Username and password on every request.
    Basic,
    /// A token from `realm` for `service`.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// The `service` parameter to pass.
        service: Option<String>,
    },
}

/// The access a request needs, as token scopes (`repository:team/app:pull`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Scope(pub(super) Vec<String>);

impl Scope {
    /// `repository:NAME:pull` or `repository:NAME:pull,push`.
    pub(super) fn repository(name: &str, push: bool) -> Self {
        let actions = if push { "pull,push" } else { "pull" };
        Self(vec![format!("repository:{name}:{actions}")])
    }

    /// No repository access (`GET /v2/`, login).
    pub(super) fn none() -> Self {
        Self(Vec::new())
    }

    /// This scope plus pull access to `name` (for a cross-repository mount).
    pub(super) fn with_pull(&self, name: &str) -> Self {
        let mut scopes = self.0.clone();
        scopes.push(format!("repository:{name}:pull"));
        Self(scopes)
    }
}

/// Parses a `WWW-Authenticate` header; `None` for schemes we do not speak.
pub(super) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(params);
    let realm = params.get("realm")?.clone();
    Some(Challenge::Bearer { realm, service: params.get("service").cloned() })
}

/// `key="value", key2=value2` with commas allowed inside quotes.
fn parse_params(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            },
            None => after.split_once(',').unwrap_or((after, "")),
        };
        params.insert(key, value.to_string());
        rest = tail.trim_start().trim_start_matches(',');
    }
    params
}

struct Token {
    value: String,
    /// When to fetch a new one: a little before the registry stops taking it.
    refresh_at: Instant,
}

#[derive(Default)]
struct State {
    /// What each host asked for in its last 401.
    challenges: HashMap<String, Challenge>,
    tokens: HashMap<(String, Scope), Token>,
    /// Credentials per host, looked up once (`None`: anonymous).
    credentials: HashMap<String, Option<Credential>>,
}

/// Authentication state shared by every request of a [`super::Client`].
pub(super) struct Auth {
    file: AuthFile,
    state: Mutex<State>,
}

/// Tokens without `expires_in` last 60 s (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: u64 = 60;

impl Auth {
    pub(super) fn new(file: AuthFile) -> Self {
        Self { file, state: Mutex::new(State::default()) }
    }

    /// Uses `credential` for `host` instead of the config file (login).
    pub(super) fn set_credential(&self, host: &str, credential: Option<Credential>) {
        let mut state = self.lock();
        state.credentials.insert(host.to_string(), credential);
        state.tokens.retain(|(h, _), _| h != host);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn credential(&self, host: &str) -> Result<Option<Credential>, RegistryError> {
        if let Some(known) = self.lock().credentials.get(host) {
            return Ok(known.clone());
        }
        let found = match self.file.get(host) {
            Ok(found) => found,
            // A configured helper that is not installed: go anonymous, as
            // public images need no credentials, but say why.
            Err(e @ super::CredentialError::Helper { .. }) => {
                tracing::warn!(registry = host, error = %e, "no credentials");
                None
            }
            Err(e) => return Err(e.into()),
        };
        self.lock().credentials.insert(host.to_string(), found.clone());
        Ok(found)
    }

    /// Where the credentials for `host` came from, for error messages.
    pub(super) fn describe_credential(&self, host: &str) -> String {
        match self.lock().credentials.get(host) {
            Some(Some(c)) => format!("the credentials of user {:?} were refused", c.username),
            _ => format!("no credentials for {host} in {}", self.file.path().display()),
        }
    }

    /// The `Authorization` header for a request to `host` needing `scope`,
    /// fetching a token first when the host wants one and ours is missing or
    /// about to expire. `None` until the host has challenged us.
    pub(super) fn header(
        &self,
        transport: &Transport,
        host: &str,
        scope: &Scope,
    ) -> Result<Option<String>, RegistryError> {
        let challenge = self.lock().challenges.get(host).cloned();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credential(host)?.map(|c| basic(&c))),
            Some(Challenge::Bearer { realm, service }) => {
                let key = (host.to_string(), scope.clone());
                if let Some(token) = self.lock().tokens.get(&key) {
                    if Instant::now() < token.refresh_at {
                        return Ok(Some(format!("Bearer {}", token.value)));
                    }
                }
                let credential = self.credential(host)?;
                let token =
                    fetch_token(transport, host, &realm, service.as_deref(), scope, credential)?;
                let header = format!("Bearer {}", token.value);
                self.lock().tokens.insert(key, token);
                Ok(Some(header))
            }
        }
    }

    /// Records the challenge of a `401` to a request sent with `sent` and
    /// forgets the token it refused (unless a concurrent request already
    /// replaced it). Returns whether a retry can do better: the challenge is
    /// new, the request went without credentials, or it carried a token
    /// (which may have expired on the way).
    pub(super) fn challenged(
        &self,
        host: &str,
        header: Option<&str>,
        scope: &Scope,
        sent: Option<&str>,
    ) -> bool {
        let Some(challenge) = header.and_then(parse_challenge) else {
            return false;
        };
        let mut state = self.lock();
        let key = (host.to_string(), scope.clone());
        let current = state.tokens.get(&key).map(|t| format!("Bearer {}", t.value));
        if current.is_some() && current.as_deref() == sent {
            state.tokens.remove(&key);
        }
        let changed = state.challenges.get(host) != Some(&challenge);
        state.challenges.insert(host.to_string(), challenge);
        changed || sent.is_none_or(|s| s.starts_with("Bearer "))
    }
}

fn basic(credential: &Credential) -> String {
    let raw = format!("{}:{}", credential.username, credential.secret);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Asks the token server for a token: a GET with basic credentials, or
/// Docker's OAuth2 POST when the credential is an identity token.
fn fetch_token(
    transport: &Transport,
    host: &str,
    realm: &str,
    service: Option<&str>,
    scope: &Scope,
    credential: Option<Credential>,
) -> Result<Token, RegistryError> {
    let mut query: Vec<(&str, &str)> = Vec::new();
    if let Some(service) = service {
        query.push(("service", service));
    }
    let started = Instant::now();
    let response = match credential.as_ref().and_then(|c| c.identity_token()) {
        Some(refresh_token) => {
            let scopes = scope.0.join(" ");
            let mut form = query.clone();
            form.extend([
                ("grant_type", "refresh_token"),
                ("client_id", "rmount"),
                ("refresh_token", refresh_token),
                ("scope", scopes.as_str()),
            ]);
            transport.execute(realm, &|http| http.post(realm).form(&form))?
        }
        None => {
            for s in &scope.0 {
                query.push(("scope", s));
            }
            if let Some(c) = &credential {
                query.push(("account", &c.username));
            }
            transport.execute(realm, &|http| {
                let request = http.get(realm).query(&query);
                match &credential {
                    Some(c) => request.header(reqwest::header::AUTHORIZATION, basic(c)),
                    None => request,
                }
            })?
        }
    };
    let status = response.status();
    let body = response.bytes().map_err(|e| RegistryError::Unreachable {
        url: realm.to_string(),
        reason: e.to_string(),
    })?;
    if status == 401 || status == 403 {
        let who = match &credential {
            Some(c) => format!("the token server refused user {:?}", c.username),
            None => "the token server wants credentials".to_string(),
        };
        return Err(RegistryError::Unauthorized {
            registry: host.to_string(),
            detail: format!("{who} ({})", error_message(&body)),
        });
    }
    if !status.is_success() {
        return Err(RegistryError::Status {
            url: realm.to_string(),
            status: status.as_u16(),
            message: error_message(&body),
        });
    }
    let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
        RegistryError::Invalid { what: format!("token from {realm}"), reason: e.to_string() }
    })?;
    let value =
        parsed.token.or(parsed.access_token).filter(|t| !t.is_empty()).ok_or_else(|| {
            RegistryError::Invalid {
                what: format!("token from {realm}"),
                reason: "no token".into(),
            }
        })?;
    let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME));
    // Refresh a fifth early (at most 30 s), counted from when we asked.
    let margin = (lifetime / 5).min(Duration::from_secs(30));
    Ok(Token { value, refresh_at: started + lifetime - margin })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_with_quoted_commas() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#;
        assert_eq!(
            parse_challenge(header),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("basic"), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge("bearer realm=http://127.0.0.1:1/t, service=reg"),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: Some("reg".into())
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None, "realm is required");
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn scopes_name_repositories_and_actions() {
        assert_eq!(Scope::repository("a/b", false).0, ["repository:a/b:pull"]);
        assert_eq!(
            Scope::repository("a/b", true).with_pull("c").0,
            ["repository:a/b:pull,push", "repository:c:pull"]
        );
    }

    #[test]
    fn a_refused_token_is_forgotten_and_refused_basic_credentials_stop_retries() {
        let auth = Auth::new(AuthFile::at("/nonexistent/config.json"));
        let scope = Scope::repository("a", false);
        let bearer = r#"Bearer realm="http://127.0.0.1:9/token""#;
        assert!(auth.challenged("h", Some(bearer), &scope, None), "first challenge");
        assert!(auth.challenged("h", Some(bearer), &scope, None), "sent without credentials");
        let token = |v: &str| Token {
            value: v.into(),
            refresh_at: Instant::now() + Duration::from_secs(60),
        };
        auth.lock().tokens.insert(("h".into(), scope.clone()), token("t1"));
        assert!(auth.challenged("h", Some(bearer), &scope, Some("Bearer t1")), "token refused");
        assert!(auth.lock().tokens.is_empty(), "the refused token is dropped");
        // A concurrent request already fetched t2: a late 401 for t1 keeps it.
        auth.lock().tokens.insert(("h".into(), scope.clone()), token("t2"));
        assert!(auth.challenged("h", Some(bearer), &scope, Some("Bearer t1")));
        assert_eq!(auth.lock().tokens.len(), 1);
        let basic = r#"Basic realm="r""#;
        assert!(auth.challenged("h", Some(basic), &scope, Some("Bearer t2")), "new scheme");
        assert!(!auth.challenged("h", Some(basic), &scope, Some("Basic dTpw")), "refused");
        assert!(!auth.challenged("h", None, &scope, None), "no challenge to act on");
    }
}
