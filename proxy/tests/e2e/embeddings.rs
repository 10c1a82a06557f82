//! Embeddings through the official OpenAI SDK against every provider that has them: Azure's
//! deployments natively; Gemini (`batchEmbedContents`), Vertex (`predict`) and Bedrock (Titan
//! and Cohere on InvokeModel) translated, each against its strict fake. Prints one matrix
//! (provider × case), and checks what each call was billed. (OpenAI's own pass-through lane is
//! `responses.rs`'s `embeddings_pass_through_to_openai_pools_and_bill_their_input`.)

use serde_json::{json, Value};
use tokn_testkit::harness::ProxyProcess;
use tokn_testkit::{fake_embedding, AzureBehavior, FakeAzure, FakeBedrock, FakeGoogle};

use crate::common::*;

const GEMINI_KEY: &str = "AIzaSyFakeGeminiKeyEmbeddings00000001";
const AWS_KEY_ID: &str = "AKIDEXAMPLEEMBED0001";
const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYsecretE01";
const AZURE_KEY: &str = "azure-seller-key-embeddings-0001";

/// Each catalog model: (id, provider, upstream model, input price per 1M tokens).
const MODELS: &[(&str, &str, &str, u64)] = &[
    ("emb-azure", "azure", "text-embedding-3-small", 20_000),
    ("emb-gemini", "gemini", "gemini-embedding-001", 150_000),
    ("emb-vertex", "vertex", "gemini-embedding-001", 150_000),
    (
        "emb-titan",
        "bedrock",
        "amazon.titan-embed-text-v2:0",
        20_000,
    ),
    ("emb-cohere", "bedrock", "cohere.embed-english-v3", 100_000),
];

/// Per model: two texts as floats (with `dimensions` where the model takes it), then one text
/// as the SDK asks by default (base64, decoded by the SDK).
const SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, key, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}

def call(**kw):
    try:
        e = client.embeddings.create(**kw)
        return {"vectors": [d.embedding[:4] for d in e.data], "dims": [len(d.embedding) for d in e.data],
                "indexes": [d.index for d in e.data], "model": e.model, "usage": e.usage.model_dump()}
    except openai.APIStatusError as err:
        return {"status": err.status_code, "param": err.body.get("param"), "code": err.body.get("code")}

for model, dims in cases:
    extra = {"dimensions": dims} if dims else {}
    out[model] = {
        "two": call(model=model, input=["first text", "a second, longer text"], encoding_format="float", **extra),
        "one": call(model=model, input="one text"),
    }
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_embeds_through_every_provider_that_has_embeddings() {
    let google = FakeGoogle::start(Default::default()).await.unwrap();
    google.allow_key(GEMINI_KEY);
    let sa = google.service_account("tokn-embed");
    let bedrock = FakeBedrock::start("us-east-1", Default::default())
        .await
        .unwrap();
    bedrock.add_aws_key(AWS_KEY_ID, AWS_SECRET, None);
    let azure = FakeAzure::start(AzureBehavior::default(), &["text-embedding-3-small"])
        .await
        .unwrap();
    let proxy = start(&google, &bedrock, &azure, &sa.json);

    // Titan takes 256, 512 or 1024 dimensions; Cohere's length is fixed.
    let cases = json!([
        ["emb-azure", 256],
        ["emb-gemini", 256],
        ["emb-vertex", 256],
        ["emb-titan", 256],
        ["emb-cohere", null]
    ]);
    let out = run_openai_sdk(
        SCRIPT,
        vec![proxy.base_url(), KEY.to_owned(), cases.to_string()],
    )
    .await;

    let texts = ["first text", "a second, longer text"];
    let expected = |text: &str, dims: usize| -> Vec<f64> {
        fake_embedding(text, dims)[..4]
            .iter()
            .map(|f| f64::from(*f))
            .collect()
    };
    let close = |got: &Value, want: &[f64]| {
        got.as_array().unwrap().len() == want.len()
            && got
                .as_array()
                .unwrap()
                .iter()
                .zip(want)
                .all(|(g, w)| (g.as_f64().unwrap() - w).abs() < 1e-6)
    };
    let mut matrix = vec![format!(
        "{:<11} {:<8} {:<36} {:<28} {}",
        "model",
        "provider",
        "two texts, floats, dimensions",
        "one text, SDK default base64",
        "billed tokens (source)"
    )];
    let records = proxy.usage_records();
    for (id, provider, upstream, price) in MODELS {
        let r = &out[*id];
        let two = &r["two"];
        let one = &r["one"];
        let two_cell = match *id {
            // One text per call: a clear 400 naming `input`, nothing sent.
            "emb-titan" => {
                assert_eq!(two["status"], 400, "{id}: {r}");
                assert_eq!(two["param"], "input", "{id}: {r}");
                "400 input (one text per call)".to_owned()
            }
            _ => {
                let dims = if *id == "emb-cohere" { 1024 } else { 256 };
                assert_eq!(two["dims"], json!([dims, dims]), "{id}: {r}");
                assert_eq!(two["indexes"], json!([0, 1]), "{id}: {r}");
                for (i, text) in texts.iter().enumerate() {
                    assert!(
                        close(&two["vectors"][i], &expected(text, dims)),
                        "{id}: vector {i} is not the fake's for its text: {r}"
                    );
                }
                // A pass-through answer names the upstream's model, a translated one the
                // catalog's.
                let named = if *provider == "azure" { *upstream } else { *id };
                assert_eq!(two["model"], named, "{id}: {r}");
                format!("ok, {dims} dims, in order")
            }
        };
        let default_dims = match *provider {
            "azure" => 1536,
            "gemini" => 3072,
            "vertex" => 768,
            _ => 1024,
        };
        assert_eq!(one["dims"], json!([default_dims]), "{id}: {r}");
        assert!(
            close(&one["vectors"][0], &expected("one text", default_dims)),
            "{id}: the base64 vector decodes to the fake's: {r}"
        );

        // Billed for input tokens alone, at the model's input price × the pool's ratio; the
        // answer's usage is what was billed.
        let served: Vec<&Value> = records
            .iter()
            .filter(|rec| rec["model"] == *id && rec["status"] == 200)
            .collect();
        let calls = if *id == "emb-titan" { 1 } else { 2 };
        assert_eq!(served.len(), calls, "{id}: {served:?}");
        let last = served.last().unwrap();
        let tokens = last["usage"]["prompt_tokens"].as_u64().unwrap();
        assert_eq!(one["usage"]["prompt_tokens"], tokens, "{id}: {r}");
        assert_eq!(last["usage"]["completion_tokens"], 0);
        let source = last["usage_source"].as_str().unwrap();
        let (want_tokens, want_source) = match *provider {
            // The fakes report a word count: "one text" is 2 words.
            "azure" | "vertex" | "bedrock" => (2, "reported"),
            // Gemini reports nothing: ⌈8 bytes / 4⌉.
            _ => (2, "estimated"),
        };
        assert_eq!((tokens, source), (want_tokens, want_source), "{id}: {last}");
        let list = (tokens * price).div_ceil(1_000_000);
        assert_eq!(last["list_cost_micros"], list, "{id}: {last}");
        matrix.push(format!(
            "{id:<11} {provider:<8} {two_cell:<36} {:<28} {tokens} ({source})",
            format!("ok, {default_dims} dims")
        ));
    }
    eprintln!("\nembeddings matrix (OpenAI SDK):\n{}\n", matrix.join("\n"));

    // What each upstream received: its own API's body, the texts in order.
    let gemini = google
        .received()
        .into_iter()
        .find(|r| r.path.ends_with(":batchEmbedContents"))
        .unwrap();
    assert_eq!(
        gemini.path,
        "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    );
    assert_eq!(
        gemini.body["requests"][1],
        json!({"model": "models/gemini-embedding-001",
            "content": {"parts": [{"text": texts[1]}]}, "outputDimensionality": 256})
    );
    let vertex = google
        .received()
        .into_iter()
        .find(|r| r.path.ends_with(":predict"))
        .unwrap();
    assert_eq!(
        vertex.body,
        json!({"instances": [{"content": texts[0]}, {"content": texts[1]}],
            "parameters": {"outputDimensionality": 256}})
    );
    let cohere = bedrock
        .received()
        .into_iter()
        .find(|r| r.path.contains("cohere"))
        .unwrap();
    assert_eq!(
        cohere.body,
        json!({"texts": texts, "input_type": "search_document"})
    );
    let azure_call = &azure.received()[0];
    assert!(
        azure_call
            .path
            .starts_with("/openai/deployments/text-embedding-3-small/embeddings?api-version="),
        "{}",
        azure_call.path
    );
    assert_eq!(azure_call.body["dimensions"], 256);
}

fn start(google: &FakeGoogle, bedrock: &FakeBedrock, azure: &FakeAzure, sa: &str) -> ProxyProcess {
    let mut toml = String::new();
    for (id, provider, upstream, price) in MODELS {
        toml.push_str(&format!(
            "[[models]]\nid = \"{id}\"\nprovider = \"{provider}\"\nupstream_model = \"{upstream}\"\n\
             input_price_micros_per_mtok = {price}\noutput_price_micros_per_mtok = 0\n\n"
        ));
    }
    toml.push_str(&format!(
        r#"
[[pools]]
id = "az"
provider = "azure"
endpoint = "{azure}"
api_key = "{AZURE_KEY}"
models = ["emb-azure"]
price_ratio = 0.6

[[pools]]
id = "gm"
provider = "gemini"
base_url = "{google}"
api_key = "{GEMINI_KEY}"
models = ["emb-gemini"]
price_ratio = 0.6

[[pools]]
id = "vx"
provider = "vertex"
base_url = "{google}"
service_account_json = "env:TEST_VERTEX_SA"
location = "us-central1"
models = ["emb-vertex"]
price_ratio = 0.6

[[pools]]
id = "br"
provider = "bedrock"
base_url = "{bedrock}"
region = "us-east-1"
access_key_id = "{AWS_KEY_ID}"
secret_access_key = "{AWS_SECRET}"
models = ["emb-titan", "emb-cohere"]
price_ratio = 0.6

[[keys]]
id = "key-main"
account = "acct-1"
key = "env:TEST_BUYER_KEY"
"#,
        azure = azure.base_url(),
        google = google.base_url(),
        bedrock = bedrock.base_url(),
    ));
    ProxyProcess::start(
        binary(),
        "embeddings-providers",
        &toml,
        &[("TEST_BUYER_KEY", KEY), ("TEST_VERTEX_SA", sa)],
    )
}
