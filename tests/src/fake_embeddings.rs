//! What every fake's embeddings endpoint shares: the deterministic vector of a text, the word
//! count the fakes report as its tokens, and OpenAI's list answer (the OpenAI and Azure fakes).
//!
//! A fake's vector depends only on the input text and the dimension count, so a test can tell
//! which vector belongs to which input ([`fake_embedding`]). Token counts are words, not the
//! bytes/4 a gateway may estimate, so a test can tell whose count was billed ([`word_count`]).

use serde_json::{json, Value};

/// The vector the fakes answer for `text` with `dims` dimensions: `values[j] =
/// ((text.chars().count() + j) % 10) / 10`.
pub fn fake_embedding(text: &str, dims: usize) -> Vec<f32> {
    let chars = text.chars().count();
    (0..dims)
        .map(|j| ((chars + j) % 10) as f32 / 10.0)
        .collect()
}

/// The tokens the fakes report for `text`: its whitespace-separated words, at least 1 when the
/// text is not empty.
pub fn word_count(text: &str) -> u64 {
    let words = text.split_whitespace().count() as u64;
    if text.is_empty() {
        0
    } else {
        words.max(1)
    }
}

/// A vector as OpenAI's `encoding_format: "base64"` sends it: the little-endian `f32` bytes in
/// standard, padded base64.
pub fn embedding_base64(vector: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// OpenAI's embeddings answer: `{"object":"list","data":[{"object":"embedding","index",
/// "embedding"}],"model","usage":{"prompt_tokens","total_tokens"}}`, each embedding a float
/// array or, with `base64`, [`embedding_base64`].
pub fn openai_embeddings_list(
    vectors: &[Vec<f32>],
    base64: bool,
    model: &Value,
    prompt_tokens: u64,
) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                json!(embedding_base64(vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_follow_the_text_length() {
        assert_eq!(fake_embedding("abc", 4), [0.3, 0.4, 0.5, 0.6]);
        assert_eq!(fake_embedding("héllo", 6), [0.5, 0.6, 0.7, 0.8, 0.9, 0.0]);
        assert_eq!(fake_embedding("", 2), [0.0, 0.1]);
        assert!(fake_embedding("x", 0).is_empty());
    }

    #[test]
    fn words_are_counted_with_at_least_one_for_any_text() {
        assert_eq!(word_count("the quick  brown\tfox"), 4);
        assert_eq!(word_count("one"), 1);
        assert_eq!(word_count("   "), 1);
        assert_eq!(word_count(""), 0);
    }

    #[test]
    fn base64_is_little_endian_floats() {
        assert_eq!(embedding_base64(&[1.0]), "AACAPw==");
        assert_eq!(embedding_base64(&[]), "");
    }
}
