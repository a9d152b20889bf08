//! containerd's filter language, as `List` receives it: each filter string
//! is a conjunction of comma-separated clauses, and a snapshot matches the
//! list when it matches any string (or the list is empty).
//!
//! A clause is a field path — `name`, `parent`, `kind` or `labels.KEY`
//! (`labels."KEY"` when the key has dots or commas) — alone (the field is
//! present and not empty), or followed by `==`, `!=` or `~=` (a regular
//! expression) and a value, bare or double-quoted.

use super::{Info, Kind, Result, SnapshotError};
use regex::Regex;

/// A parsed filter list.
#[derive(Debug, Default)]
pub struct Filter {
    alternatives: Vec<Vec<Clause>>,
}

#[derive(Debug)]
struct Clause {
    field: Field,
    test: Test,
}

#[derive(Debug)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug)]
enum Test {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Filter {
    /// Parses containerd filter strings.
    pub fn parse(filters: &[String]) -> Result<Filter> {
        let alternatives = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| Parser { rest: f.trim(), whole: f }.conjunction())
            .collect::<Result<_>>()?;
        Ok(Filter { alternatives })
    }

    /// Whether `info` passes the filter.
    pub fn matches(&self, info: &Info) -> bool {
        self.alternatives.is_empty()
            || self.alternatives.iter().any(|all| all.iter().all(|c| c.matches(info)))
    }
}

impl Clause {
    fn matches(&self, info: &Info) -> bool {
        let kind = match info.kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        };
        let value = match &self.field {
            Field::Name => Some(info.name.as_str()),
            Field::Parent => info.parent.as_deref(),
            Field::Kind => Some(kind),
            Field::Label(key) => info.labels.get(key).map(String::as_str),
        };
        match (&self.test, value) {
            (Test::Present, value) => value.is_some_and(|v| !v.is_empty()),
            (Test::Equal(want), value) => value.unwrap_or("") == want,
            (Test::NotEqual(want), value) => value.unwrap_or("") != want,
            (Test::Matches(re), value) => re.is_match(value.unwrap_or("")),
        }
    }
}

struct Parser<'a> {
    rest: &'a str,
    whole: &'a str,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> SnapshotError {
        SnapshotError::InvalidArgument(format!("filter {:?}: {what}", self.whole))
    }

    fn conjunction(mut self) -> Result<Vec<Clause>> {
        let mut clauses = vec![self.clause()?];
        while let Some(rest) = self.rest.strip_prefix(',') {
            self.rest = rest.trim_start();
            clauses.push(self.clause()?);
        }
        match self.rest.is_empty() {
            true => Ok(clauses),
            false => Err(self.error(&format!("unexpected {:?}", self.rest))),
        }
    }

    fn clause(&mut self) -> Result<Clause> {
        let field = match self.word()?.as_str() {
            "name" => Field::Name,
            "parent" => Field::Parent,
            "kind" => Field::Kind,
            "labels" => {
                self.rest = self.rest.strip_prefix('.').ok_or_else(|| self.error("labels.KEY"))?;
                Field::Label(self.word()?)
            }
            other => return Err(self.error(&format!("unknown field {other:?}"))),
        };
        self.rest = self.rest.trim_start();
        let test = if let Some(rest) = self.rest.strip_prefix("==") {
            self.rest = rest.trim_start();
            Test::Equal(self.word()?)
        } else if let Some(rest) = self.rest.strip_prefix("!=") {
            self.rest = rest.trim_start();
            Test::NotEqual(self.word()?)
        } else if let Some(rest) = self.rest.strip_prefix("~=") {
            self.rest = rest.trim_start();
            let pattern = self.word()?;
            Test::Matches(Regex::new(&pattern).map_err(|e| self.error(&e.to_string()))?)
        } else {
            Test::Present
        };
        self.rest = self.rest.trim_start();
        Ok(Clause { field, test })
    }

    /// A bare word (up to `.`, `,`, `=`, `!`, `~` or space) or a quoted string.
    fn word(&mut self) -> Result<String> {
        if let Some(quoted) = self.rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        self.rest = &quoted[i + 1..];
                        return Ok(out);
                    }
                    '\\' => out.push(chars.next().ok_or_else(|| self.error("dangling \\"))?.1),
                    c => out.push(c),
                }
            }
            return Err(self.error("unterminated quote"));
        }
        let end = self
            .rest
            .find(|c: char| matches!(c, '.' | ',' | '=' | '!' | '~') || c.is_whitespace())
            .unwrap_or(self.rest.len());
        let (word, rest) = self.rest.split_at(end);
        if word.is_empty() {
            return Err(self.error("expected a field or value"));
        }
        self.rest = rest;
        Ok(word.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn info(name: &str, parent: Option<&str>, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(Into::into),
            kind: Kind::Committed,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            created: Utc::now(),
            updated: Utc::now(),
        }
    }

    fn passes(filters: &[&str], info: &Info) -> bool {
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        Filter::parse(&filters).expect("parse").matches(info)
    }

    #[test]
    fn clauses_and_alternatives() {
        let a = info("a", Some("p"), &[("containerd.io/gc.root", "x"), ("team", "blue")]);
        assert!(passes(&[], &a));
        assert!(passes(&["name==a"], &a));
        assert!(!passes(&["name==b"], &a));
        assert!(passes(&["name==b", "parent==p"], &a), "alternatives are ORed");
        assert!(!passes(&["name==a,parent==q"], &a), "clauses are ANDed");
        assert!(passes(&["kind==committed"], &a));
        assert!(passes(&[r#"labels."containerd.io/gc.root""#], &a));
        assert!(passes(&["labels.team==blue", "name!=a"], &a));
        assert!(passes(&[r#"labels.team~="^bl""#], &a));
        assert!(!passes(&["labels.missing"], &a));
        assert!(passes(&["labels.missing!=x"], &a));
    }

    #[test]
    fn malformed_filters_are_invalid_arguments() {
        for bad in ["size==1", "name==", "labels", "name==a,", r#"name=="a"#, "name~=("] {
            let err = Filter::parse(&[bad.to_string()]).expect_err(bad);
            assert!(matches!(err, SnapshotError::InvalidArgument(_)), "{bad}: {err}");
        }
    }
}
