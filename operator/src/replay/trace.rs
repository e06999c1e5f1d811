//! Request traces: one row per request, its arrival time and token counts.
//!
//! CSV with a header row. Columns are found by name, in any order:
//! - the arrival time: `TIMESTAMP` (`YYYY-MM-DD HH:MM:SS[.fraction]`, as in the Azure
//!   LLM inference traces) or `time_s` (seconds from any origin);
//! - prompt tokens: `ContextTokens` or `prompt_tokens`;
//! - generated tokens: `GeneratedTokens` or `generated_tokens`.
//!
//! Times are shifted so that the first request arrives at 0 s; rows may come in any order.

use std::str::FromStr;

/// One request of a trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TraceRequest {
    /// Arrival, seconds from the first request.
    pub at: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub generated_tokens: u32,
}

/// A request trace, in arrival order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// The requests.
    pub requests: Vec<TraceRequest>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TraceError {
    /// No header row.
    #[error("the trace is empty; it needs a header row and one row per request")]
    Empty,
    /// A needed column is missing.
    #[error("the header has no {0} column (header: {1:?})")]
    MissingColumn(&'static str, String),
    /// A row does not parse.
    #[error("line {line}: {message}")]
    Row {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl Trace {
    /// Parses a CSV trace (see the module docs for the format).
    pub fn parse_csv(text: &str) -> Result<Trace, TraceError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines.next().ok_or(TraceError::Empty)?;
        let cols: Vec<&str> = header.split(',').map(str::trim).collect();
        let find = |names: &[&str], what: &'static str| {
            cols.iter()
                .position(|c| names.contains(c))
                .ok_or_else(|| TraceError::MissingColumn(what, header.to_string()))
        };
        let (time_col, civil) = match find(&["TIMESTAMP"], "time") {
            Ok(i) => (i, true),
            Err(_) => (find(&["time_s"], "TIMESTAMP or time_s")?, false),
        };
        let prompt_col = find(
            &["ContextTokens", "prompt_tokens"],
            "ContextTokens or prompt_tokens",
        )?;
        let gen_col = find(
            &["GeneratedTokens", "generated_tokens"],
            "GeneratedTokens or generated_tokens",
        )?;
        // Civil times stay exact until they are made relative to the earliest one.
        let mut rows: Vec<(Time, u32, u32)> = Vec::new();
        for (i, line) in lines {
            let row_err = |message: String| TraceError::Row {
                line: i + 1,
                message,
            };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let field = |c: usize| {
                fields.get(c).copied().ok_or_else(|| {
                    row_err(format!("{} fields, expected {}", fields.len(), cols.len()))
                })
            };
            let s = field(time_col)?;
            let at = if civil {
                jiff::civil::DateTime::from_str(s)
                    .map(Time::Civil)
                    .map_err(|e| row_err(format!("bad TIMESTAMP {s:?}: {e}")))?
            } else {
                s.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .map(Time::Seconds)
                    .ok_or_else(|| row_err(format!("bad time_s {s:?}")))?
            };
            let count = |c: usize, name: &str| {
                let s = field(c)?;
                s.parse::<u32>()
                    .map_err(|_| row_err(format!("bad {name} {s:?}: expected a token count")))
            };
            rows.push((
                at,
                count(prompt_col, "prompt tokens")?,
                count(gen_col, "generated tokens")?,
            ));
        }
        let first_civil = rows.iter().filter_map(|r| r.0.civil()).min();
        let first_secs = rows
            .iter()
            .filter_map(|r| r.0.seconds())
            .min_by(f64::total_cmp)
            .unwrap_or(0.0);
        let mut requests: Vec<TraceRequest> = rows
            .into_iter()
            .map(|(t, prompt_tokens, generated_tokens)| TraceRequest {
                at: match (t, first_civil) {
                    (Time::Civil(c), Some(f)) => c.duration_since(f).as_secs_f64(),
                    (Time::Seconds(s), _) => s - first_secs,
                    (Time::Civil(_), None) => 0.0,
                },
                prompt_tokens,
                generated_tokens,
            })
            .collect();
        requests.sort_by(|a, b| a.at.total_cmp(&b.at));
        Ok(Trace { requests })
    }

    /// Seconds from the first arrival to the last.
    pub fn duration(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.at)
    }
}

#[derive(Clone, Copy)]
enum Time {
    Civil(jiff::civil::DateTime),
    Seconds(f64),
}

impl Time {
    fn civil(self) -> Option<jiff::civil::DateTime> {
        match self {
            Time::Civil(c) => Some(c),
            Time::Seconds(_) => None,
        }
    }

    fn seconds(self) -> Option<f64> {
        match self {
            Time::Seconds(s) => Some(s),
            Time::Civil(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_azure_format_and_shifts_to_zero() {
        let t = Trace::parse_csv(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:17:04.0319600,3180,8\n\
             2023-11-16 18:17:03.9799600,4808,10\n\
             2023-11-16 18:18:03.9799600,10,1\n",
        )
        .unwrap();
        assert_eq!(t.requests.len(), 3);
        assert_eq!(t.requests[0].prompt_tokens, 4808);
        assert!((t.requests[1].at - 0.052).abs() < 1e-6);
        assert!((t.duration() - 60.0).abs() < 1e-6);
    }

    #[test]
    fn reads_the_plain_format_with_columns_in_any_order() {
        let t = Trace::parse_csv("generated_tokens,time_s,prompt_tokens\n5,10.5,100\n7,12,200\n")
            .unwrap();
        assert_eq!(
            t.requests[1],
            TraceRequest {
                at: 1.5,
                prompt_tokens: 200,
                generated_tokens: 7
            }
        );
    }

    #[test]
    fn bad_input_is_named_with_its_line() {
        assert_eq!(Trace::parse_csv(""), Err(TraceError::Empty));
        assert!(matches!(
            Trace::parse_csv("time_s,prompt_tokens\n1,2\n"),
            Err(TraceError::MissingColumn(..))
        ));
        let e =
            Trace::parse_csv("time_s,prompt_tokens,generated_tokens\n1,2,3\n2,x,3\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: bad prompt tokens \"x\": expected a token count"
        );
        let e = Trace::parse_csv("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("line 2: bad TIMESTAMP"), "{e}");
        let e = Trace::parse_csv("time_s,prompt_tokens,generated_tokens\n1,2\n").unwrap_err();
        assert_eq!(e.to_string(), "line 2: 2 fields, expected 3");
    }
}
