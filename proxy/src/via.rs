//! Loop detection: every request this proxy sends upstream carries `x-tokn-via`, the chain of
//! tokn instances it passed through, this one last. A request that arrives with this instance
//! in its chain (a pool's `base_url` that points back here, directly or through other tokn
//! gateways), or with a chain already [`HOPS_MAX`] long, is refused with 508 before it is
//! authenticated, billed or sent anywhere: a loop costs one hop, not a recursion until file
//! descriptors run out.

use std::sync::LazyLock;

use http::HeaderValue;

use crate::error::GatewayError;

pub const VIA_HEADER: &str = "x-tokn-via";

/// Most tokn gateways one request may pass through (a seller may list a key of another tokn).
pub const HOPS_MAX: usize = 8;

/// The longest chain header read (`HOPS_MAX` ids and their separators, with room to spare).
const CHAIN_BYTES_MAX: usize = 512;

/// This process's id in chains: random per start, so two instances behind one address (a
/// graceful upgrade) are still told apart, and it names no host.
static INSTANCE: LazyLock<String> =
    LazyLock::new(|| format!("tokn-{:016x}", rand::random::<u64>()));

/// The chain header for this instance alone (most requests: they arrive from a client).
static OWN: LazyLock<HeaderValue> = LazyLock::new(|| {
    HeaderValue::from_str(&INSTANCE).unwrap_or_else(|_| HeaderValue::from_static("tokn"))
});

/// The chain of a request that arrived from a client: this instance alone.
pub fn own() -> HeaderValue {
    OWN.clone()
}

/// The `x-tokn-via` value to send upstream for a request that arrived with `incoming`, or
/// the refusal when the request is looping.
pub fn outgoing(incoming: Option<&HeaderValue>) -> Result<HeaderValue, GatewayError> {
    let Some(incoming) = incoming else {
        return Ok(own());
    };
    let chain = incoming
        .to_str()
        .ok()
        .filter(|c| c.len() <= CHAIN_BYTES_MAX)
        .ok_or_else(|| GatewayError::loop_detected(HOPS_MAX))?;
    let hops: Vec<&str> = chain
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    if hops.len() >= HOPS_MAX || hops.contains(&INSTANCE.as_str()) {
        return Err(GatewayError::loop_detected(hops.len()));
    }
    let mut value = hops.join(", ");
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(&INSTANCE);
    HeaderValue::from_str(&value).map_err(|_| GatewayError::loop_detected(hops.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn a_client_request_starts_the_chain_and_a_gateways_request_extends_it() {
        assert_eq!(outgoing(None).unwrap(), INSTANCE.as_str());
        let other = value("tokn-00000000000000aa,tokn-00000000000000bb");
        assert_eq!(
            outgoing(Some(&other)).unwrap(),
            format!(
                "tokn-00000000000000aa, tokn-00000000000000bb, {}",
                *INSTANCE
            )
            .as_str()
        );
    }

    #[test]
    fn a_request_that_passed_here_before_or_too_many_gateways_is_refused() {
        let status = |v: &HeaderValue| outgoing(Some(v)).unwrap_err().status();
        // Directly back, and back through another gateway.
        assert_eq!(status(&value(&INSTANCE)), 508);
        assert_eq!(
            status(&value(&format!("{}, tokn-00000000000000aa", *INSTANCE))),
            508
        );
        let long = ["tokn-x"; HOPS_MAX].join(",");
        assert_eq!(status(&value(&long)), 508);
        let short = ["tokn-x"; HOPS_MAX - 1].join(",");
        assert!(outgoing(Some(&value(&short))).is_ok());
        // A chain that is not text, or absurdly long, is not followed either.
        assert_eq!(status(&HeaderValue::from_bytes(b"tokn-\xff").unwrap()), 508);
        assert_eq!(status(&value(&"x".repeat(CHAIN_BYTES_MAX + 1))), 508);
    }
}
