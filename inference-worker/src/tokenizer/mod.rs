//! Tokenizers built from the GGUF metadata, as llama.cpp builds them: GPT-2 style
//! byte-level BPE (`tokenizer.ggml.model = gpt2`, with merges and a pre-tokenizer regex)
//! and SentencePiece style (`llama`, with scores and byte fallback). Control and
//! user-defined tokens in the text (`<|im_start|>`) are matched before the model's own
//! splitting, as llama.cpp does with `parse_special`.

mod chat;

use std::collections::HashMap;

use gguf::{Gguf, Value};

pub use chat::{ChatMessage, ChatTemplate};

/// Why a tokenizer cannot be built from the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer key is missing or has the wrong type.
    #[error(transparent)]
    Gguf(#[from] gguf::Error),
    /// The tokenizer model is one this worker does not implement.
    #[error("tokenizer model {0:?} is not supported (supported: gpt2, llama)")]
    Unsupported(String),
    /// The vocabulary is inconsistent.
    #[error("invalid tokenizer: {0}")]
    Invalid(String),
    /// The chat template does not parse.
    #[error("chat template: {0}")]
    Template(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bpe,
    Spm,
}

/// A tokenizer for one model.
pub struct Tokenizer {
    kind: Kind,
    /// Token text as stored (byte-level unicode for BPE, `▁` for SPM spaces).
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// BPE merges: (left, right) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Control / user-defined tokens, longest first.
    special: Vec<(String, u32)>,
    /// A matcher over `special` (leftmost, then longest), so splitting a text around
    /// them is one pass however many it holds.
    special_matcher: Option<aho_corasick::AhoCorasick>,
    /// What each token decodes to (empty for control tokens).
    pieces: Vec<Vec<u8>>,
    pre: Vec<fancy_regex::Regex>,
    byte_tokens: [Option<u32>; 256],
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence tokens (the file's eos, and end-of-turn when present).
    pub eos: Vec<u32>,
    add_bos: bool,
    add_space_prefix: bool,
}

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// GPT-2's reversible map between bytes and printable characters, built once: the
/// tokenizer needs it for every vocabulary entry at load and every piece it encodes.
struct ByteMap {
    to_char: [char; 256],
    to_byte: HashMap<char, u8>,
}

fn byte_map() -> &'static ByteMap {
    static MAP: std::sync::OnceLock<ByteMap> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let mut to_char = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            to_char[b as usize] = if printable {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
        }
        let to_byte = to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        ByteMap { to_char, to_byte }
    })
}

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>, TokenizerError> {
    let arr = g
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| gguf::Error::Metadata {
            key: key.into(),
            problem: "missing or not an array".into(),
        })?;
    arr.iter()
        .map(|v| v.as_str().map(String::from))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| TokenizerError::Invalid(format!("{key} holds non-strings")))
}

fn optional_numbers(g: &Gguf, key: &str) -> Vec<f64> {
    g.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

impl Tokenizer {
    /// Builds the tokenizer the file describes.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?.to_string();
        let kind = match model.as_str() {
            "gpt2" => Kind::Bpe,
            "llama" => Kind::Spm,
            _ => return Err(TokenizerError::Unsupported(model)),
        };
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = optional_numbers(g, "tokenizer.ggml.token_type")
            .iter()
            .map(|v| *v as i32)
            .collect();
        let mut scores: Vec<f32> = optional_numbers(g, "tokenizer.ggml.scores")
            .iter()
            .map(|v| *v as f32)
            .collect();
        scores.resize(tokens.len(), 0.0);
        let ty = |i: usize| types.get(i).copied().unwrap_or(1);
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merges = HashMap::new();
        if kind == Kind::Bpe {
            for (rank, m) in strings(g, "tokenizer.ggml.merges")?.iter().enumerate() {
                let (a, b) = m
                    .split_once(' ')
                    .ok_or_else(|| TokenizerError::Invalid(format!("merge {m:?} has no space")))?;
                if let (Some(&ia), Some(&ib), Some(&im)) =
                    (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}")))
                {
                    merges.entry((ia, ib)).or_insert((rank as u32, im));
                }
            }
        }
        let mut special: Vec<(String, u32)> = (0..tokens.len())
            .filter(|&i| matches!(ty(i), CONTROL | USER_DEFINED) && !tokens[i].is_empty())
            .map(|i| (tokens[i].clone(), i as u32))
            .collect();
        special.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let special_matcher = if special.is_empty() {
            None
        } else {
            Some(
                aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(special.iter().map(|(s, _)| s.as_str()))
                    .map_err(|e| TokenizerError::Invalid(format!("special tokens: {e}")))?,
            )
        };
        let pieces = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if ty(i) == CONTROL {
                    Vec::new()
                } else {
                    piece_bytes(kind, t)
                }
            })
            .collect();
        let mut byte_tokens = [None; 256];
        let chars = &byte_map().to_char;
        for b in 0..256usize {
            byte_tokens[b] = match kind {
                Kind::Bpe => ids.get(&chars[b].to_string()).copied(),
                Kind::Spm => ids
                    .get(&format!("<0x{b:02X}>"))
                    .copied()
                    .filter(|&i| ty(i as usize) == BYTE),
            };
        }
        let pre = match kind {
            Kind::Bpe => pre_tokenizer(
                g.get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default"),
            )?,
            Kind::Spm => Vec::new(),
        };
        let id = |k: &str| {
            g.get(k)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        let bool_or = |k: &str, d: bool| match g.get(k) {
            Some(Value::Bool(b)) => *b,
            _ => d,
        };
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        eos.extend(id("tokenizer.ggml.eot_token_id"));
        // Chat models end turns with an end-of-turn control token the file may not name.
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(&i) = ids.get(t) {
                if !eos.contains(&i) {
                    eos.push(i);
                }
            }
        }
        Ok(Tokenizer {
            kind,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            add_bos: bool_or("tokenizer.ggml.add_bos_token", kind == Kind::Spm),
            add_space_prefix: bool_or("tokenizer.ggml.add_space_prefix", kind == Kind::Spm),
            tokens,
            ids,
            scores,
            merges,
            special,
            special_matcher,
            pieces,
            pre,
            byte_tokens,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The stored text of a token (for tests and logs).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Tokenizes `text`, adding BOS when the model asks for it. Linear in the text's
    /// length (`benches/tokenize.rs` measures it on adversarial inputs).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_until(text, &std::sync::atomic::AtomicBool::new(false))
            .expect("never cancelled")
    }

    /// `encode`, giving up (`None`) as soon as `cancel` is set: the request it was for
    /// has gone, and a worker thread should not go on tokenizing for nobody.
    pub fn encode_until(
        &self,
        text: &str,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Option<Vec<u32>> {
        let mut out = Vec::new();
        if self.add_bos {
            out.extend(self.bos);
        }
        let mut first = true;
        for (piece, special) in self.split_special(text) {
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            if let Some(id) = special {
                out.push(id);
                continue;
            }
            match self.kind {
                Kind::Bpe => self.encode_bpe(piece, cancel, &mut out),
                Kind::Spm => self.encode_spm(piece, first && self.add_space_prefix, &mut out),
            }
            first = false;
        }
        (!cancel.load(std::sync::atomic::Ordering::Relaxed)).then_some(out)
    }

    /// The most bytes of text one token stands for: a text longer than `n` times this
    /// surely needs more than `n` tokens, so it can be refused without tokenizing it.
    pub fn max_token_bytes(&self) -> usize {
        self.pieces
            .iter()
            .map(Vec::len)
            .chain(self.special.iter().map(|(s, _)| s.len()))
            .max()
            .unwrap_or(1)
            .max(1)
            // SentencePiece adds one leading space to the text.
            + usize::from(self.add_space_prefix)
    }

    /// Splits `text` around control and user-defined tokens: the earliest match first,
    /// the longest token where several start at the same place. One pass over the text.
    fn split_special<'t>(&self, text: &'t str) -> Vec<(&'t str, Option<u32>)> {
        let Some(matcher) = &self.special_matcher else {
            return vec![(text, None)]
                .into_iter()
                .filter(|(t, _)| !t.is_empty())
                .collect();
        };
        let mut out = Vec::new();
        let mut last = 0;
        for m in matcher.find_iter(text) {
            if m.start() > last {
                out.push((&text[last..m.start()], None));
            }
            out.push((
                &text[m.start()..m.end()],
                Some(self.special[m.pattern().as_usize()].1),
            ));
            last = m.end();
        }
        if last < text.len() {
            out.push((&text[last..], None));
        }
        out
    }

    fn encode_bpe(&self, text: &str, cancel: &std::sync::atomic::AtomicBool, out: &mut Vec<u32>) {
        let chars = &byte_map().to_char;
        let mut pieces = vec![text.to_string()];
        for re in &self.pre {
            pieces = pieces.iter().flat_map(|p| regex_split(re, p)).collect();
        }
        for piece in pieces {
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let mapped: String = piece.bytes().map(|b| chars[b as usize]).collect();
            if let Some(&id) = self.ids.get(&mapped) {
                out.push(id);
                continue;
            }
            let syms: Vec<u32> = piece
                .bytes()
                .filter_map(|b| self.byte_tokens[b as usize])
                .collect();
            // Repeatedly apply the lowest-ranked merge present (leftmost on ties).
            out.extend(merge_pairs(syms, |a, b| {
                let &(rank, merged) = self.merges.get(&(*a, *b))?;
                Some((std::cmp::Reverse(rank), merged))
            }));
        }
    }

    fn encode_spm(&self, text: &str, prefix: bool, out: &mut Vec<u32>) {
        let text = format!("{}{}", if prefix { " " } else { "" }, text).replace(' ', "\u{2581}");
        // Symbols start as single characters; merge the adjacent pair whose union is a
        // token with the highest score (leftmost on ties), as SentencePiece's BPE mode
        // does.
        let syms: Vec<String> = text.chars().map(String::from).collect();
        let merged = merge_pairs(syms, |a, b| {
            let joined = format!("{a}{b}");
            let id = *self.ids.get(&joined)?;
            Some((Score(self.scores[id as usize]), joined))
        });
        for s in merged {
            match self.ids.get(&s) {
                Some(&id) => out.push(id),
                // Byte fallback: unknown characters become their UTF-8 bytes.
                None => out.extend(s.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
        }
    }

    /// The token of one byte, where the vocabulary has one. Some have none (SmolLM2 has
    /// no token for byte 0x04): such a byte is dropped when it is not part of a longer
    /// token, as llama.cpp's BPE tokenizer drops it.
    pub fn byte_token(&self, b: u8) -> Option<u32> {
        self.byte_tokens[b as usize]
    }

    /// The bytes a token stands for; control tokens render as nothing.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Decodes tokens to text (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        let s = String::from_utf8_lossy(&bytes).into_owned();
        match (self.kind, self.add_space_prefix) {
            (Kind::Spm, true) => s.strip_prefix(' ').map(String::from).unwrap_or(s),
            _ => s,
        }
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
}

/// An `f32` score ordered totally, for the merge queue.
#[derive(Clone, Copy, PartialEq)]
struct Score(f32);

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Merges adjacent symbols until no pair merges: each step merges the pair whose
/// `merge` priority is highest, the leftmost among equals, into the symbol `merge`
/// gives. The same result as rescanning the whole sequence after every merge, in
/// O(n log n) rather than O(n²): the candidate pairs wait in a heap over a linked list
/// of symbols, and a pair whose symbols have changed since it was queued is skipped
/// when it comes up (as Hugging Face's and tiktoken's tokenizers do).
fn merge_pairs<S, P, F>(syms: Vec<S>, merge: F) -> Vec<S>
where
    S: Clone,
    P: Ord,
    F: Fn(&S, &S) -> Option<(P, S)>,
{
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n = syms.len();
    let mut sym: Vec<Option<S>> = syms.into_iter().map(Some).collect();
    // Symbol versions: a queued pair is stale once either side changed.
    let mut version = vec![0u32; n];
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    // (priority, leftmost first, left, right, their versions).
    type Entry<P> = (P, Reverse<usize>, usize, (u32, u32));
    let mut heap: BinaryHeap<Entry<P>> = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<Entry<P>>,
                sym: &[Option<S>],
                version: &[u32],
                l: usize,
                r: usize| {
        if let (Some(a), Some(b)) = (&sym[l], &sym[r]) {
            if let Some((p, _)) = merge(a, b) {
                heap.push((p, Reverse(l), r, (version[l], version[r])));
            }
        }
    };
    for i in 0..n.saturating_sub(1) {
        push(&mut heap, &sym, &version, i, i + 1);
    }
    while let Some((_, Reverse(l), r, (vl, vr))) = heap.pop() {
        if sym[l].is_none()
            || sym[r].is_none()
            || version[l] != vl
            || version[r] != vr
            || next[l] != r
        {
            continue;
        }
        let (Some(a), Some(b)) = (&sym[l], &sym[r]) else {
            continue;
        };
        let Some((_, merged)) = merge(a, b) else {
            continue;
        };
        sym[l] = Some(merged);
        sym[r] = None;
        version[l] += 1;
        next[l] = next[r];
        if next[l] < n {
            prev[next[l]] = l;
        }
        if prev[l] < n {
            push(&mut heap, &sym, &version, prev[l], l);
        }
        if next[l] < n {
            push(&mut heap, &sym, &version, l, next[l]);
        }
    }
    sym.into_iter().flatten().collect()
}

/// The bytes a (non-control) token's stored text stands for.
fn piece_bytes(kind: Kind, text: &str) -> Vec<u8> {
    match kind {
        Kind::Bpe => {
            let to_byte = &byte_map().to_byte;
            let mut out = Vec::new();
            for c in text.chars() {
                match to_byte.get(&c) {
                    Some(&b) => out.push(b),
                    None => out.extend(c.to_string().bytes()),
                }
            }
            out
        }
        Kind::Spm => {
            if let Some(hex) = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    return vec![b];
                }
            }
            text.replace('\u{2581}', " ").into_bytes()
        }
    }
}

/// Splits as llama.cpp's `unicode_regex_split` does: matches become pieces and so does
/// any text between them.
fn regex_split(re: &fancy_regex::Regex, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut last = 0;
    for m in re.find_iter(text).flatten() {
        if m.start() > last {
            out.push(text[last..m.start()].to_string());
        }
        if m.end() > m.start() {
            out.push(m.as_str().to_string());
        }
        last = m.end();
    }
    if last < text.len() {
        out.push(text[last..].to_string());
    }
    out
}

/// The pre-tokenizer regexes llama.cpp applies for `tokenizer.ggml.pre`, in order.
fn pre_tokenizer(pre: &str) -> Result<Vec<fancy_regex::Regex>, TokenizerError> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let exprs: Vec<&str> = match pre {
        // StarCoder-family vocabularies (SmolLM, StarCoder, Refact) split digits first.
        "smollm" | "starcoder" | "refact" | "codeshell" => vec![r"\p{N}", GPT2],
        "llama3" | "llama-bpe" | "smaug-bpe" => vec![LLAMA3],
        "qwen2" | "deepseek-r1-qwen" => vec![QWEN2],
        "gpt-2" | "gpt2" | "default" | "phi-2" | "jina-es" => vec![GPT2],
        other => {
            return Err(TokenizerError::Unsupported(format!(
                "gpt2 with pre-tokenizer {other}"
            )))
        }
    };
    exprs
        .iter()
        .map(|e| fancy_regex::Regex::new(e).map_err(|err| TokenizerError::Invalid(err.to_string())))
        .collect()
}

#[cfg(test)]
mod tests;
