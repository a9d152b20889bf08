//! One HTTP exchange with retries: connection errors, `429 Too Many
//! Requests` and `5xx` are retried with exponential backoff and jitter, and
//! a `Retry-After` in seconds is honoured. Authentication is not handled
//! here (see `client`): a 401 is returned to the caller like any answer.

use super::RegistryError;
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::StatusCode;
use std::time::Duration;

/// How often and how patiently failed requests are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, including the first.
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub base_delay: Duration,
    /// Upper bound of one delay (also caps `Retry-After`).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (0-based): exponential, with
    /// up to 50% random jitter so clients that failed together spread out.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << retry.min(16)).min(self.max_delay);
        exp.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// The shared HTTP client plus the retry policy.
pub(super) struct Transport {
    pub(super) http: Http,
    pub(super) retry: RetryPolicy,
}

/// Statuses worth retrying: the server is overloaded or briefly broken.
fn transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// `Retry-After: <seconds>`; the HTTP-date form falls back to backoff.
fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

impl Transport {
    pub(super) fn new(retry: RetryPolicy) -> Result<Self, RegistryError> {
        let http = Http::builder()
            .user_agent(concat!("rmount/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            // Per read in the blocking client: a stalled body fails, a long one does not.
            .timeout(Duration::from_secs(60))
            // Redirects to blob storage: reqwest drops Authorization when the host changes.
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .map_err(|e| RegistryError::Invalid {
                what: "HTTP client".into(),
                reason: e.to_string(),
            })?;
        Ok(Self { http, retry })
    }

    /// Sends the request `build` makes (called again for every attempt) and
    /// returns the first answer that is not transient, or the last one.
    pub(super) fn execute(
        &self,
        url: &str,
        build: &dyn Fn(&Http) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        self.execute_with(self.retry.attempts, url, build)
    }

    /// [`Transport::execute`] with at most `attempts` attempts.
    pub(super) fn execute_with(
        &self,
        attempts: u32,
        url: &str,
        build: &dyn Fn(&Http) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let mut retry = 0;
        loop {
            let last = retry + 1 >= attempts;
            match build(&self.http).send() {
                Ok(response) if transient(response.status()) && !last => {
                    let delay = retry_after(&response)
                        .map(|d| d.min(self.retry.max_delay))
                        .unwrap_or_else(|| self.retry.backoff(retry));
                    tracing::info!(%url, status = %response.status(), ?delay, "retrying");
                    drop(response);
                    std::thread::sleep(delay);
                }
                Ok(response) => return Ok(response),
                Err(e) if !last => {
                    let delay = self.retry.backoff(retry);
                    tracing::info!(%url, error = %e, ?delay, "retrying after a connection error");
                    std::thread::sleep(delay);
                }
                Err(e) => {
                    return Err(RegistryError::Unreachable {
                        url: url.to_string(),
                        reason: error_chain(&e),
                    })
                }
            }
            retry += 1;
        }
    }
}

/// An error and its causes on one line ("error sending request: connection refused").
pub(super) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_bounded() {
        let policy = RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for retry in 0..20 {
            let d = policy.backoff(retry);
            let full = (Duration::from_millis(100) * 2u32.pow(retry.min(16))).min(policy.max_delay);
            assert!(d >= full / 2 && d <= full, "retry {retry}: {d:?} vs {full:?}");
        }
    }

    #[test]
    fn only_overload_and_gateway_errors_are_transient() {
        for code in [429, 500, 502, 503, 504] {
            assert!(transient(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [200, 206, 401, 404, 416, 501] {
            assert!(!transient(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }
}
