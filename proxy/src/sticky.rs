//! Sticky routing per conversation: the one exception to strict FIFO. Requests of one
//! conversation keep going to the pool that served it while that pool can serve, so provider
//! prompt caches keep hitting and thinking signatures and encrypted reasoning verify. A
//! conversation is named by the client (`x-claude-code-session-id`, Codex's `session_id` or
//! `conversation_id` header, or the body's `prompt_cache_key`); requests without a name are
//! strictly FIFO.
//!
//! Bounded: at most [`CONVERSATIONS_MAX`] conversations, kept in two generations (a lookup
//! promotes from the older; when the current one fills, the older is dropped whole), so memory
//! and every operation are O(1). A pool that fails, is backed off or leaves the listing releases
//! a conversation on its next request, which FIFO then places again. Per proxy: a fleet behind
//! a load balancer without affinity places a conversation once per proxy it reaches.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// Conversations remembered at most (both generations).
pub const CONVERSATIONS_MAX: usize = 100_000;

/// A conversation of one model, hashed (the client's name is never kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conversation(u64);

#[derive(Default)]
struct Generations {
    current: HashMap<Conversation, Arc<str>>,
    older: HashMap<Conversation, Arc<str>>,
}

pub struct Sticky {
    hasher: std::collections::hash_map::RandomState,
    generations: Mutex<Generations>,
}

impl Default for Sticky {
    fn default() -> Self {
        Self {
            // Keyed per process: clients cannot aim names at one bucket.
            hasher: std::collections::hash_map::RandomState::new(),
            generations: Mutex::default(),
        }
    }
}

impl Sticky {
    /// The conversation `name` names for `model`.
    pub fn conversation(&self, model: &str, name: &str) -> Conversation {
        let mut h = self.hasher.build_hasher();
        model.hash(&mut h);
        name.hash(&mut h);
        Conversation(h.finish())
    }

    /// The pool that served the conversation last, if any.
    pub fn pool_of(&self, c: Conversation) -> Option<Arc<str>> {
        let mut g = lock(&self.generations);
        if let Some(pool) = g.current.get(&c) {
            return Some(pool.clone());
        }
        let pool = g.older.remove(&c)?;
        Self::insert(&mut g, c, pool.clone());
        Some(pool)
    }

    /// The conversation was served by `pool`.
    pub fn remember(&self, c: Conversation, pool: &Arc<str>) {
        let mut g = lock(&self.generations);
        if g.current.get(&c).is_some_and(|p| p == pool) {
            return;
        }
        g.older.remove(&c);
        Self::insert(&mut g, c, pool.clone());
    }

    /// The conversation's pool failed it: FIFO places it again.
    pub fn release(&self, c: Conversation) {
        let mut g = lock(&self.generations);
        g.current.remove(&c);
        g.older.remove(&c);
    }

    fn insert(g: &mut Generations, c: Conversation, pool: Arc<str>) {
        if g.current.len() >= CONVERSATIONS_MAX / 2 {
            g.older = std::mem::take(&mut g.current);
        }
        g.current.insert(c, pool);
    }

    /// Conversations remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        let g = lock(&self.generations);
        g.current.len() + g.older.len()
    }
}

/// The conversation name a request carries: Claude Code's and Codex's session headers first,
/// then the body's `prompt_cache_key`.
pub fn conversation_name<'a>(
    headers: &'a http::HeaderMap,
    prompt_cache_key: Option<&'a str>,
) -> Option<&'a str> {
    ["x-claude-code-session-id", "session_id", "conversation_id"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .or(prompt_cache_key)
        .filter(|n| !n.is_empty() && n.len() <= 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_keeps_its_pool_until_released_and_memory_stays_bounded() {
        let sticky = Sticky::default();
        let a = sticky.conversation("m", "session-1");
        assert_eq!(a, sticky.conversation("m", "session-1"));
        assert_ne!(a, sticky.conversation("other-model", "session-1"));
        let pool: Arc<str> = Arc::from("pool-2");
        assert_eq!(sticky.pool_of(a), None);
        sticky.remember(a, &pool);
        assert_eq!(sticky.pool_of(a).as_deref(), Some("pool-2"));
        sticky.release(a);
        assert_eq!(sticky.pool_of(a), None);

        sticky.remember(a, &pool);
        for i in 0..CONVERSATIONS_MAX * 2 {
            let c = sticky.conversation("m", &format!("other-{i}"));
            sticky.remember(c, &pool);
            if i % 10_000 == 0 {
                // A conversation in use is promoted and survives the rotations.
                assert_eq!(sticky.pool_of(a).as_deref(), Some("pool-2"));
            }
            assert!(sticky.len() <= CONVERSATIONS_MAX);
        }
    }
}
