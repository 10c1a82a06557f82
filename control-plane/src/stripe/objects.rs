//! The parts of Stripe's objects tokn$ reads. Fields it does not read are ignored (Stripe adds
//! fields within an API version); every field read is optional or defaulted where Stripe may
//! leave it out.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    /// `paid`, `unpaid` or `no_payment_required`.
    #[serde(default)]
    pub payment_status: String,
    #[serde(default)]
    pub amount_total: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub client_reference_id: Option<String>,
    #[serde(default)]
    pub payment_intent: Option<String>,
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// An event as delivered to a webhook (its `data.object` read by type).
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub livemode: bool,
    #[serde(default)]
    pub created: i64,
    /// The connected account, on Connect events.
    #[serde(default)]
    pub account: Option<String>,
    pub data: EventData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

/// A charge, as `charge.refunded` carries it.
#[derive(Debug, Clone, Deserialize)]
pub struct Charge {
    pub id: String,
    #[serde(default)]
    pub amount: i64,
    /// Everything refunded so far (cumulative).
    #[serde(default)]
    pub amount_refunded: i64,
    #[serde(default)]
    pub payment_intent: Option<String>,
}

/// A dispute, as `charge.dispute.created` carries it.
#[derive(Debug, Clone, Deserialize)]
pub struct Dispute {
    pub id: String,
    #[serde(default)]
    pub amount: i64,
    #[serde(default)]
    pub charge: Option<String>,
    #[serde(default)]
    pub payment_intent: Option<String>,
}

/// A connected account: whether it can be paid.
#[derive(Debug, Clone, Deserialize)]
pub struct Account {
    pub id: String,
    #[serde(default)]
    pub payouts_enabled: bool,
    #[serde(default)]
    pub details_submitted: bool,
    #[serde(default)]
    pub capabilities: BTreeMap<String, String>,
    #[serde(default)]
    pub requirements: Option<Requirements>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Requirements {
    #[serde(default)]
    pub currently_due: Vec<String>,
    #[serde(default)]
    pub past_due: Vec<String>,
    #[serde(default)]
    pub disabled_reason: Option<String>,
}

impl Account {
    /// Transfers to it succeed: the `transfers` capability is active and its payouts are on.
    pub fn payable(&self) -> bool {
        self.capabilities.get("transfers").map(String::as_str) == Some("active")
            && self.payouts_enabled
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AccountLink {
    pub url: String,
    #[serde(default)]
    pub expires_at: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Transfer {
    pub id: String,
    pub amount: i64,
    #[serde(default)]
    pub amount_reversed: i64,
    #[serde(default)]
    pub currency: String,
    #[serde(default)]
    pub destination: Option<String>,
    #[serde(default)]
    pub transfer_group: Option<String>,
    #[serde(default)]
    pub reversed: bool,
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A page of a list (`{"object":"list","data":[…],"has_more":…}`).
#[derive(Debug, Clone, Deserialize)]
pub struct List<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Balance {
    #[serde(default)]
    pub available: Vec<BalanceAmount>,
    #[serde(default)]
    pub pending: Vec<BalanceAmount>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BalanceAmount {
    pub amount: i64,
    pub currency: String,
}

impl Balance {
    /// The available amount in `currency` (minor units).
    pub fn available_in(&self, currency: &str) -> i64 {
        self.available
            .iter()
            .filter(|a| a.currency == currency)
            .map(|a| a.amount)
            .sum()
    }
}
