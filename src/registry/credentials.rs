//! TEMPORARY STUB (helper is writing the real module).
#![allow(missing_docs, dead_code)]
use std::path::{Path, PathBuf};
#[derive(Clone, PartialEq, Eq)]
pub struct Credential { pub username: String, pub secret: String }
impl Credential { pub fn identity_token(&self) -> Option<&str> { (self.username == "<token>").then_some(self.secret.as_str()) } }
#[derive(Debug, thiserror::Error)]
pub enum CredentialError { #[error("x")] Io }
#[derive(Debug, Clone)]
pub struct AuthFile { path: PathBuf }
impl AuthFile {
    pub fn discover() -> Self { Self { path: PathBuf::from("/root/.docker/config.json") } }
    pub fn at(path: impl Into<PathBuf>) -> Self { Self { path: path.into() } }
    pub fn path(&self) -> &Path { &self.path }
    pub fn get(&self, _registry: &str) -> Result<Option<Credential>, CredentialError> { Ok(None) }
    pub fn store(&self, _registry: &str, _credential: &Credential) -> Result<(), CredentialError> { Ok(()) }
    pub fn erase(&self, _registry: &str) -> Result<bool, CredentialError> { Ok(false) }
}
