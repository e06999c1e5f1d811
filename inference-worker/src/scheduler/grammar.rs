//! Constrained decoding for structured output (`response_format`), with llguidance, the
//! grammar engine llama.cpp and others use: a JSON schema becomes a grammar over bytes;
//! before each token the matcher says which tokens of the vocabulary may come next and
//! the rest are masked out of the logits; the chosen token then advances it. The
//! vocabulary is the model's own (each token's bytes), so any tokenizer works.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::tokenizer::Tokenizer;

/// Whitespace allowed between JSON tokens (llama.cpp's `SPACE_RULE`).
const WHITESPACE: &str = r"( |\n[ \t]{0,20})";

/// Grammars over one model's vocabulary (built once: it indexes every token).
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// Indexes `tok`'s vocabulary. Control tokens have no bytes and so are never allowed,
    /// except the end of sequence once the grammar is complete.
    pub fn new(tok: &Tokenizer) -> Result<Grammars, String> {
        let words: Vec<Vec<u8>> = (0..tok.vocab_size() as u32)
            .map(|id| tok.token_bytes(id).to_vec())
            .collect();
        let eos = tok.eos.first().copied().unwrap_or(0);
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, eos), &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        Ok(Grammars { factory })
    }

    /// A constraint to JSON matching `schema` (`{"type": "object"}` for any object).
    /// Whitespace between JSON tokens is bounded as llama.cpp's json-schema-to-grammar
    /// bounds it (one space, or a newline and up to 20 spaces or tabs): unbounded, a
    /// small model can fill `max_tokens` with blank lines. A schema's own `x-guidance`
    /// options (llguidance's extension) take precedence.
    pub fn json_schema(&self, mut schema: serde_json::Value) -> Result<Constraint, String> {
        if let Some(fields) = schema.as_object_mut() {
            fields
                .entry("x-guidance")
                .or_insert_with(|| serde_json::json!({"whitespace_pattern": WHITESPACE}));
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(Constraint { matcher }),
        }
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets the logit of every token the grammar does not allow next to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let mut any = false;
        for (id, l) in logits.iter_mut().enumerate() {
            if allowed.is_allowed(id as u32) {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if any {
            Ok(())
        } else {
            Err("the grammar allows no token of this vocabulary here".into())
        }
    }

    /// Advances past `token`; `true` once the grammar is complete (nothing may follow).
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| e.to_string())?;
        Ok(self.matcher.is_stopped())
    }
}
