//! Stripe's request encoding: `application/x-www-form-urlencoded` pairs, nested fields as
//! `parent[child]`, lists always indexed (`line_items[0][quantity]`), booleans `true`/`false`,
//! absent values omitted. Pairs keep the order they were added in, so one request always
//! encodes to the same bytes (an idempotency key replays only the same parameters).

/// The parameters of one Stripe call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

impl Form {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key=value` (the key already bracketed, e.g. `metadata[purchase_id]`).
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        self.pairs.push((key.to_owned(), value.to_string()));
        self
    }

    /// Adds `key=value` when there is a value.
    pub fn set_opt(self, key: &str, value: Option<impl ToString>) -> Self {
        match value {
            Some(v) => self.set(key, v),
            None => self,
        }
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The encoded body (or query string).
    pub fn encode(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.pairs.iter())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Form;

    #[test]
    fn nested_keys_and_values_are_encoded_as_stripe_reads_them() {
        let form = Form::new()
            .set("mode", "payment")
            .set("line_items[0][price_data][unit_amount]", 2000)
            .set(
                "line_items[0][price_data][product_data][name]",
                "20 USD credit pack",
            )
            .set(
                "success_url",
                "https://app.example.com/ok?session_id={CHECKOUT_SESSION_ID}",
            )
            .set_opt("customer_email", None::<&str>)
            .set("metadata[pack_id]", "usd20");
        assert_eq!(
            form.encode(),
            "mode=payment&line_items%5B0%5D%5Bprice_data%5D%5Bunit_amount%5D=2000\
             &line_items%5B0%5D%5Bprice_data%5D%5Bproduct_data%5D%5Bname%5D=20+USD+credit+pack\
             &success_url=https%3A%2F%2Fapp.example.com%2Fok%3Fsession_id%3D%7BCHECKOUT_SESSION_ID%7D\
             &metadata%5Bpack_id%5D=usd20"
        );
        let back: Vec<(String, String)> = form_urlencoded::parse(form.encode().as_bytes())
            .into_owned()
            .collect();
        assert_eq!(back, form.pairs());
    }
}
