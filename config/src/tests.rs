use super::*;

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn secrets(name: &str) -> Option<String> {
    match name {
        "SELLER_KEY" => Some("sk-test-seller".to_owned()),
        "BUYER_KEY" => Some("tok_live_buyer_key_0001".to_owned()),
        _ => None,
    }
}

#[test]
fn embedded_default_is_valid() {
    let valid = load(DEFAULT_CONFIG_TOML, no_env(), &secrets).expect("default config loads");
    assert_eq!(valid.config.models[0].id, "mock");
    assert_eq!(valid.pools[0].price_ratio_ppm, 600_000);
    assert_eq!(valid.keys[0].hash, hash_key(DEMO_KEY));
}

#[test]
fn example_fleet_config_is_valid_with_its_secrets() {
    let text = include_str!("../examples/fleet-edge.toml");
    let env = |name: &str| Some(format!("secret-value-for-{name}"));
    let valid = load(text, no_env(), &env).expect("example loads");
    let Credential::Openai(openai) = &valid.pools[0].config.credential else {
        panic!("an openai pool")
    };
    let (url, key) = (
        UpstreamUrl::parse(openai.base_url()).unwrap(),
        openai.api_key.expose(),
    );
    assert_eq!(url.host, "api.openai.com");
    assert!(url.tls);
    assert_eq!(url.port, 443);
    assert_eq!(url.base_path, "/v1");
    assert_eq!(key, "secret-value-for-OPENAI_SELLER_A");
}

#[test]
fn unknown_fields_are_rejected_with_their_name() {
    let text = format!("{DEFAULT_CONFIG_TOML}\n[limits]\nbody_max = 3\n");
    let err = load(&text, no_env(), &secrets).expect_err("unknown field");
    assert!(err.to_string().contains("body_max"), "{err}");
}

#[test]
fn every_problem_is_listed_at_once() {
    let text = r#"
[server]
listen = ["nope"]
threads = 0
[[models]]
id = "m"
provider = "openai"
input_price_micros_per_mtok = 1
output_price_micros_per_mtok = 1
[[pools]]
id = "p"
provider = "openai"
base_url = "ftp://x"
api_key = "env:MISSING"
models = ["m", "ghost"]
price_ratio = 1.5
[[keys]]
id = "k"
account = "a"
key = "short"
"#;
    let err = load(text, no_env(), &secrets).expect_err("invalid");
    let all = err.to_string();
    for needle in [
        "server.listen[0]",
        "server.threads",
        "pools[0].base_url",
        "pools[0].api_key: environment variable `MISSING`",
        "`ghost` is not in the catalog",
        "pools[0].price_ratio",
        "keys[0].key",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
    assert_eq!(err.0.len(), 7, "{all}");
}

#[test]
fn unknown_fields_and_mistyped_values_are_all_listed_in_one_pass() {
    let text = r#"
[server]
listn = ["127.0.0.1:1"]
foo = 1
threads = "many"
listen = [7]
[limits]
body_max = 3
[nonsense]
x = 1
[[keys]]
id = "k"
account = "a"
key = "tok_live_buyer_key_0001"
colour = "red"
"#;
    let err = load(text, no_env(), &secrets).expect_err("invalid");
    let all = err.to_string();
    for needle in [
        "server.listn: unknown field `listn`",
        "server.foo: unknown field `foo`",
        "server.threads: invalid type",
        "server.listen[0]: invalid type",
        "limits.body_max: unknown field",
        "nonsense: unknown field `nonsense`",
        "keys[0].colour: unknown field `colour`",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
    assert_eq!(err.0.len(), 7, "{all}");
}

#[test]
fn env_overrides_set_nested_and_indexed_fields() {
    let env = vec![
        (
            "TOKN__SERVER__LISTEN".to_owned(),
            r#"["127.0.0.1:9999"]"#.to_owned(),
        ),
        (
            "TOKN__LIMITS__FAILOVER_ATTEMPTS_MAX".to_owned(),
            "5".to_owned(),
        ),
        ("TOKN__USAGE__PATH".to_owned(), "/tmp/u.jsonl".to_owned()),
        ("TOKN__POOLS__0__PRICE_RATIO".to_owned(), "0.5".to_owned()),
        ("UNRELATED".to_owned(), "x".to_owned()),
    ];
    let valid = load(DEFAULT_CONFIG_TOML, env, &secrets).expect("loads");
    assert_eq!(valid.config.server.listen, vec!["127.0.0.1:9999"]);
    assert_eq!(valid.config.limits.failover_attempts_max, 5);
    assert_eq!(valid.config.usage.path, "/tmp/u.jsonl");
    let ratios: Vec<u64> = valid.pools.iter().map(|p| p.price_ratio_ppm).collect();
    assert_eq!(ratios, vec![500_000]);
}

#[test]
fn env_override_to_a_missing_array_item_is_a_problem() {
    let env = vec![("TOKN__POOLS__7__ID".to_owned(), "x".to_owned())];
    let err = load(DEFAULT_CONFIG_TOML, env, &secrets).expect_err("out of range");
    assert!(err.to_string().contains("TOKN__POOLS__7__ID"), "{err}");
}

#[test]
fn upstream_urls_parse() {
    let u = UpstreamUrl::parse("http://127.0.0.1:8000/v1/").expect("parses");
    assert_eq!(
        (u.tls, u.host.as_str(), u.port, u.base_path.as_str()),
        (false, "127.0.0.1", 8000, "/v1")
    );
    let u = UpstreamUrl::parse("https://[::1]:8443").expect("v6");
    assert_eq!(
        (u.host.as_str(), u.port, u.base_path.as_str()),
        ("::1", 8443, "")
    );
    for bad in [
        "api.openai.com",
        "https://user:pw@x/v1",
        "http://x:0",
        "http://x/v1?q=1",
        "https://",
    ] {
        assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn secrets_never_show_in_debug_output() {
    let valid = load(
        &DEFAULT_CONFIG_TOML.replace("tok_demo_0123456789abcdef", "env:BUYER_KEY"),
        no_env(),
        &secrets,
    )
    .expect("loads");
    let dbg = format!("{:?}", valid.config.keys);
    assert!(!dbg.contains("tok_live_buyer_key_0001"), "{dbg}");
    let literal = format!("{:?}", SecretRef::from("sk-very-secret".to_owned()));
    assert!(!literal.contains("sk-very-secret"));
}

#[test]
fn the_default_catalog_covers_the_five_providers_with_sane_prices() {
    let valid = load(DEFAULT_CATALOG_TOML, no_env(), &secrets).expect("catalog loads");
    let models = &valid.config.models;
    assert!(models.len() >= 25, "{}", models.len());
    for kind in [
        ProviderKind::Openai,
        ProviderKind::Anthropic,
        ProviderKind::Bedrock,
        ProviderKind::Vertex,
        ProviderKind::Gemini,
        ProviderKind::Azure,
    ] {
        assert!(
            models.iter().any(|m| m.provider == kind),
            "{kind:?} missing"
        );
    }
    for m in models {
        // Embedding models have no output tokens.
        let embedding = m.id.contains("embed");
        assert!(
            m.input_price_micros_per_mtok > 0 && (m.output_price_micros_per_mtok > 0 || embedding),
            "{}",
            m.id
        );
        if let Some(cached) = m.cached_input_price_micros_per_mtok {
            assert!(cached <= m.input_price_micros_per_mtok, "{}", m.id);
        }
    }
    let gpt4o_mini = models.iter().find(|m| m.id == "gpt-4o-mini").unwrap();
    assert_eq!(gpt4o_mini.input_price_micros_per_mtok, 150_000); // $0.15 per 1M
                                                                 // Claude's cache writes cost 1.25× input; the dated id Claude Code sends is an alias.
    let sonnet = models.iter().find(|m| m.id == "claude-sonnet-4-5").unwrap();
    assert_eq!(sonnet.cache_write_price_micros_per_mtok, Some(3_750_000));
    assert_eq!(sonnet.aliases, ["claude-sonnet-4-5-20250929"]);
}

#[test]
fn an_alias_is_never_a_model_id_or_another_alias() {
    let catalog = |a: &str, b: &str| {
        format!(
            "[[models]]\nid = \"a\"\nprovider = \"mock\"\naliases = [{a}]\n\
             input_price_micros_per_mtok = 1\noutput_price_micros_per_mtok = 1\n\
             [[models]]\nid = \"b\"\nprovider = \"mock\"\naliases = [{b}]\n\
             input_price_micros_per_mtok = 1\noutput_price_micros_per_mtok = 1\n"
        )
    };
    assert!(load(&catalog("\"claude-a\"", "\"claude-b\""), no_env(), &secrets).is_ok());
    for (a, b, why) in [
        ("\"b\"", "", "`b` is already a model id or an alias"),
        ("\"x\"", "\"x\"", "`x` is already a model id or an alias"),
        ("\"\"", "", "must be 1 to 256 characters"),
    ] {
        let err = load(&catalog(a, b), no_env(), &secrets).expect_err(why);
        assert!(err.to_string().contains(why), "{err}");
    }
}

#[test]
fn google_pools_name_what_they_lack() {
    let text = format!(
        "{DEFAULT_CATALOG_TOML}
[[pools]]
id = \"g\"
provider = \"gemini\"
models = [\"gemini-2.5-flash\"]
price_ratio = 0.6

[[pools]]
id = \"v\"
provider = \"vertex\"
models = [\"vertex/gemini-2.5-flash\"]
price_ratio = 0.6
location = \"us central\"
service_account_json = '{{\"type\":\"service_account\",\"client_email\":\"a@p.iam.gserviceaccount.com\",\"private_key\":\"not a key\"}}'
"
    );
    let err = load(&text, no_env(), &secrets).expect_err("two bad pools");
    let text = err.to_string();
    for expected in [
        "pools[0].api_key: required",
        "pools[1].location: required",
        "pools[1].service_account_json: private_key must be a PKCS#8 PEM block",
    ] {
        assert!(text.contains(expected), "{expected} not in {text}");
    }
    assert!(!text.contains("not a key"), "a secret was echoed: {text}");
    // A Vertex field on another provider's pool is refused by that provider's credential.
    let openai_with_project = format!(
        "{DEFAULT_CATALOG_TOML}
[[pools]]
id = \"o\"
provider = \"openai\"
api_key = \"sk-x\"
models = [\"gpt-4o-mini\"]
price_ratio = 0.6
project = \"p\"
"
    );
    let err = load(&openai_with_project, no_env(), &secrets).expect_err("a vertex field");
    assert!(err.to_string().contains("unknown field `project`"), "{err}");
}

#[test]
fn control_plane_config_resolves_secrets_and_lists_every_problem() {
    let env = |name: &str| match name {
        "ADMIN" => Some("admin-token-0123456789".to_owned()),
        "PROXY" => Some("proxy-token-0123456789".to_owned()),
        "KEK" => Some("11".repeat(32)),
        "PG" => Some("postgres://u@db/tokn".to_owned()),
        _ => None,
    };
    let text = r#"
admin_token = "env:ADMIN"
proxy_token = "env:PROXY"
database_url = "env:PG"
[[kek]]
version = 3
key = "env:KEK"
[redis]
url = "redis://127.0.0.1:6379"
"#;
    let v = control_plane::load_control_plane(text, &env).expect("valid");
    assert_eq!(v.database_url.as_deref(), Some("postgres://u@db/tokn"));
    assert_eq!(v.keks, vec![(3, [0x11; 32])]);
    assert_eq!(v.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
    assert!(
        !format!("{v:?}").contains("admin-token"),
        "secrets stay out of Debug"
    );

    let bad = r#"
listen = "nowhere"
admin_token = "short"
proxy_token = "env:MISSING"
database_url = "mysql://x"
[[kek]]
version = 1
key = "abc"
[[kek]]
version = 1
key = "env:KEK"
[redis]
url = "http://x"
"#;
    let err = control_plane::load_control_plane(bad, &env)
        .expect_err("invalid")
        .to_string();
    for needle in [
        "listen",
        "admin_token",
        "proxy_token: environment variable `MISSING`",
        "database_url: must start with postgres://",
        "kek[0].key",
        "kek[1].version",
        "redis.url",
    ] {
        assert!(err.contains(needle), "{needle} missing from:\n{err}");
    }
    // Unknown and mistyped fields are listed together, each with its path, beside what
    // validation finds in the rest.
    let unknown = "admin_token = \"x\"\nproxy_token = \"env:PROXY\"\nbogus = 1\nlistn = 2\n\
                   [redis]\nurl = 7\nprefx = \"p\"\n[[kek]]\nversion = 1\nkey = \"env:KEK\"\n";
    let err = control_plane::load_control_plane(unknown, &env).expect_err("unknown fields");
    let all = err.to_string();
    for needle in [
        "bogus: unknown field `bogus`",
        "listn: unknown field `listn`",
        "redis.url: invalid type",
        "redis.prefx: unknown field `prefx`",
        "redis.url: missing field `url`",
        "admin_token: must be at least 16",
    ] {
        assert!(all.contains(needle), "{needle} missing from:\n{all}");
    }
}

#[test]
fn a_control_fed_proxy_takes_no_catalog_from_its_file() {
    let env = |name: &str| match name {
        "T" => Some("proxy-token-0123456789".to_owned()),
        "K" => Some("22".repeat(32)),
        _ => None,
    };
    let text =
        "[control]\nurl = \"http://127.0.0.1:7070\"\ntoken = \"env:T\"\nsnapshot_key = \"env:K\"\n";
    let v = load(text, no_env(), &env).expect("valid");
    let control = v.control.as_ref().expect("control");
    assert_eq!(control.snapshot_key, [0x22; 32]);
    assert!(!format!("{control:?}").contains("proxy-token"));
    // The spool holds every billed record, so the audit log may be off; without a control
    // plane it is the only usage record and may not.
    let no_audit = format!("[usage]\npath = \"\"\n{text}");
    assert!(load(&no_audit, no_env(), &env).is_ok());
    let err = load("[usage]\npath = \"\"\n", no_env(), &env).expect_err("no usage record");
    assert!(err.to_string().contains("usage.path"), "{err}");
    let with_models = format!("{DEFAULT_CONFIG_TOML}\n{text}");
    let err = load(&with_models, no_env(), &env).expect_err("catalog in the file");
    assert!(
        err.to_string().contains("come from the control plane"),
        "{err}"
    );
    // The watch carries seller credentials: plain HTTP to this host only.
    for host in ["localhost:7070", "[::1]:7070"] {
        let local = text.replace("127.0.0.1:7070", host);
        assert!(load(&local, no_env(), &env).is_ok(), "{host}");
    }
    for host in [
        "10.0.0.5:7070",
        "control.example.com",
        "127.0.0.1.nip.io:7070",
    ] {
        let remote = text.replace("127.0.0.1:7070", host);
        let err = load(&remote, no_env(), &env).expect_err(host);
        assert!(err.to_string().contains("plain http:// only"), "{err}");
        let tls = remote.replace("http://", "https://");
        assert!(load(&tls, no_env(), &env).is_ok(), "{host} over https");
    }
}

#[test]
fn azure_pools_need_an_endpoint_and_a_key_and_take_path_safe_azure_fields() {
    let config = |provider: &str, extra: &str| {
        format!(
            "{DEFAULT_CONFIG_TOML}\n[[models]]\nid = \"gpt-az\"\nprovider = \"{provider}\"\ninput_price_micros_per_mtok = 1\noutput_price_micros_per_mtok = 1\n[[pools]]\nid = \"az\"\nprovider = \"{provider}\"\n{extra}models = [\"gpt-az\"]\nprice_ratio = 0.6\n"
        )
    };
    let ok = "endpoint = \"https://res.openai.azure.com\"\napi_key = \"env:SELLER_KEY\"\n";
    let valid = load(
        &config(
            "azure",
            &format!("{ok}deployment = \"gpt-4o_prod.2\"\napi_version = \"v1\"\n"),
        ),
        no_env(),
        &secrets,
    )
    .unwrap();
    let Credential::Azure(azure) = &valid.pools.last().unwrap().config.credential else {
        panic!("an azure pool")
    };
    let url = UpstreamUrl::parse(&azure.endpoint).unwrap();
    assert_eq!(
        (url.host.as_str(), azure.api_key.expose()),
        ("res.openai.azure.com", "sk-test-seller")
    );
    assert_eq!(azure.deployment.as_deref(), Some("gpt-4o_prod.2"));
    assert_eq!(azure.api_version.as_deref(), Some("v1"));

    for (provider, extra, problem) in [
        ("azure", "api_key = \"k\"\n", "pools[1].endpoint: required"),
        (
            "azure",
            "endpoint = \"https://r.openai.azure.com\"\n",
            "pools[1].api_key: required",
        ),
        (
            "azure",
            &format!("{ok}deployment = \"a/b\"\n"),
            "pools[1].deployment: must be",
        ),
        (
            "azure",
            &format!("{ok}api_version = \"2024-10-21&x=1\"\n"),
            "pools[1].api_version: must be",
        ),
        (
            "openai",
            "api_key = \"k\"\ndeployment = \"d\"\n",
            "unknown field `deployment`",
        ),
    ] {
        let err = load(&config(provider, extra), no_env(), &secrets).expect_err(problem);
        assert!(err.to_string().contains(problem), "{err}");
    }
}

#[test]
fn anthropic_pools_default_their_base_url_and_need_a_key() {
    let pool = |extra: &str| {
        format!(
            "{DEFAULT_CATALOG_TOML}\n[[pools]]\nid = \"a\"\nprovider = \"anthropic\"\n{extra}models = [\"claude-haiku-4-5\"]\nprice_ratio = 0.6\n"
        )
    };
    let valid = load(&pool("api_key = \"sk-ant-test\"\n"), no_env(), &secrets).unwrap();
    let Credential::Anthropic(anthropic) = &valid.pools.last().unwrap().config.credential else {
        panic!("an anthropic pool")
    };
    // No base URL: the adapter's default (its tests check where requests go).
    assert_eq!(
        (anthropic.base_url.as_deref(), anthropic.api_key.expose()),
        (None, "sk-ant-test")
    );
    let err = load(&pool(""), no_env(), &secrets).expect_err("no key");
    assert!(
        err.to_string().contains("pools[0].api_key: required"),
        "{err}"
    );
}

#[test]
fn bedrock_pools_need_a_region_and_exactly_one_auth_mode() {
    let pool = |extra: &str| {
        format!(
            "{DEFAULT_CATALOG_TOML}\n[[pools]]\nid = \"b\"\nprovider = \"bedrock\"\n{extra}models = [\"bedrock/claude-sonnet-4-5\"]\nprice_ratio = 0.6\n"
        )
    };
    let bedrock = |valid: &ValidConfig| match &valid.pools.last().unwrap().config.credential {
        Credential::Bedrock(b) => b.clone(),
        other => panic!("a bedrock pool, not {other:?}"),
    };
    let keys = "access_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"s3cr3t-key\"\n";
    let valid = load(
        &pool(&format!(
            "region = \"eu-west-1\"\n{keys}session_token = \"tok\"\n"
        )),
        no_env(),
        &secrets,
    )
    .unwrap();
    let b = bedrock(&valid);
    let url = UpstreamUrl::parse(&b.base_url()).unwrap();
    assert_eq!(
        (url.host.as_str(), url.port, url.tls),
        ("bedrock-runtime.eu-west-1.amazonaws.com", 443, true)
    );
    match b.auth() {
        Some(credential::BedrockAuth::AccessKeys { session_token, .. }) => {
            assert_eq!(session_token.map(Secret::expose), Some("tok"))
        }
        _ => panic!("access keys"),
    }
    assert_eq!(b.region, "eu-west-1");
    assert!(!format!("{b:?}").contains("s3cr3t"));

    let valid = load(
        &pool("region = \"us-east-1\"\napi_key = \"bedrock-api-key\"\nbase_url = \"http://127.0.0.1:9\"\n"),
        no_env(),
        &secrets,
    )
    .unwrap();
    let b = bedrock(&valid);
    assert_eq!(UpstreamUrl::parse(&b.base_url()).unwrap().port, 9);
    assert!(
        matches!(b.auth(), Some(credential::BedrockAuth::ApiKey(k)) if k.expose() == "bedrock-api-key")
    );

    for (extra, problem) in [
        (keys.to_owned(), "pools[0].region: required"),
        (
            format!("region = \"us-east-1\"\n{keys}api_key = \"k\"\n"),
            "pools[0].give access_key_id with secret_access_key",
        ),
        (
            "region = \"us-east-1\"\n".to_owned(),
            "pools[0].give access_key_id with secret_access_key",
        ),
        (
            "region = \"us-east-1\"\naccess_key_id = \"AKID\"\n".to_owned(),
            "pools[0].give access_key_id with secret_access_key",
        ),
        // The key id is part of the SigV4 scope, which `/` separates.
        (
            "region = \"us-east-1\"\naccess_key_id = \"AK/ID\"\nsecret_access_key = \"s\"\n"
                .to_owned(),
            "pools[0].access_key_id: must be",
        ),
    ] {
        let err = load(&pool(&extra), no_env(), &secrets).expect_err(problem);
        assert!(err.to_string().contains(problem), "{err}");
    }
}

/// A generated key file (as Google issues them) whose `token_uri` is `token_uri`.
fn key_file(token_uri: &str) -> String {
    tokn_testkit::TestServiceAccount::generate("sa", "proj-1", token_uri).json
}

#[test]
fn service_account_key_files_are_parsed_and_sign_verifiable_assertions() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let text = key_file("https://oauth2.googleapis.com/token");
    let sa = google::ServiceAccount::parse(&text).unwrap();
    assert_eq!(sa.project_id, "proj-1");
    assert_eq!(sa.client_email, "sa@proj-1.iam.gserviceaccount.com");
    assert!(!format!("{sa:?}").contains("PRIVATE"));
    let jwt = sa
        .assertion(google::CLOUD_PLATFORM_SCOPE, 1_800_000_000)
        .unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], sa.private_key_id);
    assert_eq!(claims["iss"], sa.client_email);
    assert_eq!(claims["aud"], google::GOOGLE_TOKEN_AUDIENCE);
    assert_eq!(claims["exp"], 1_800_003_600u64);
    // The same key signs again identically (PKCS#1 v1.5 is deterministic), a second key file
    // differently, and their fingerprints differ.
    assert_eq!(
        jwt,
        sa.assertion(google::CLOUD_PLATFORM_SCOPE, 1_800_000_000)
            .unwrap()
    );
    let other =
        google::ServiceAccount::parse(&key_file("https://oauth2.googleapis.com/token")).unwrap();
    assert_ne!(sa.key_fingerprint(), other.key_fingerprint());
}

#[test]
fn token_uris_must_be_https_or_this_host() {
    for ok in [
        "https://oauth2.googleapis.com/token",
        "http://127.0.0.1:9/token",
        "http://localhost:9/token",
    ] {
        assert!(google::ServiceAccount::parse(&key_file(ok)).is_ok(), "{ok}");
    }
    for bad in [
        "http://oauth2.googleapis.com/token",
        "http://localhost.evil.example/token",
        "http://localhost@10.0.0.5:8080/token",
        "https://oauth2.googleapis.com/token?x=1",
        "ftp://example.com/token",
    ] {
        let err = google::ServiceAccount::parse(&key_file(bad)).unwrap_err();
        assert!(err.contains("token_uri"), "{bad}: {err}");
    }
}

#[test]
fn a_pushed_pool_this_build_refuses_is_left_out_not_fatal() {
    let base = load(DEFAULT_CONFIG_TOML, no_env(), &secrets).unwrap();
    let good_key_file = key_file("https://oauth2.googleapis.com/token");
    let pushed: PushedConfig = serde_json::from_value(serde_json::json!({
        "version": 3,
        "models": [
            {"id": "mock", "provider": "mock", "input_price_micros_per_mtok": 1,
             "output_price_micros_per_mtok": 1},
            {"id": "v", "provider": "vertex", "input_price_micros_per_mtok": 1,
             "output_price_micros_per_mtok": 1},
        ],
        "pools": [
            {"id": "mock-pool", "provider": "mock", "models": ["mock"], "price_ratio_ppm": 500000},
            {"id": "bad-location", "provider": "vertex", "models": ["v"], "price_ratio_ppm": 500000,
             "location": "US-Central1", "service_account_json": good_key_file},
            {"id": "bad-key-file", "provider": "vertex", "models": ["v"], "price_ratio_ppm": 500000,
             "location": "us-central1", "service_account_json": "{}"},
            {"id": "good", "provider": "vertex", "models": ["v"], "price_ratio_ppm": 500000,
             "location": "us-central1", "service_account_json": good_key_file},
        ],
        "keys": [],
    }))
    .unwrap();
    let (valid, skipped) = base.with_pushed(pushed).unwrap();
    let skipped_ids: Vec<&str> = skipped.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(skipped_ids, ["bad-location", "bad-key-file"]);
    assert!(skipped[0].problems[0].contains("location"), "{skipped:?}");
    let ids: Vec<&str> = valid.pools.iter().map(|p| p.config.id.as_str()).collect();
    assert_eq!(ids, ["mock-pool", "good"]);
    let Credential::Vertex(vertex) = &valid.pools[1].config.credential else {
        panic!("a vertex pool")
    };
    let account = vertex.service_account().unwrap();
    assert_eq!(vertex.project(&account), "proj-1");
}

#[test]
fn a_price_ratio_is_given_once_as_a_fraction_or_in_ppm() {
    let pool = |ratio: &str| {
        format!(
            "{DEFAULT_CONFIG_TOML}\n[[pools]]\nid = \"second\"\nprovider = \"mock\"\nmodels = [\"mock\"]\n{ratio}\n"
        )
    };
    let valid = load(&pool("price_ratio_ppm = 550000"), no_env(), &secrets).unwrap();
    assert_eq!(valid.pools[1].price_ratio_ppm, 550_000);
    for (ratio, problem) in [
        (
            "price_ratio = 0.5\nprice_ratio_ppm = 500000",
            "give exactly one",
        ),
        ("", "give exactly one"),
        ("price_ratio_ppm = 0", "price_ratio_ppm: must be"),
        ("price_ratio_ppm = 1000001", "price_ratio_ppm: must be"),
    ] {
        let err = load(&pool(ratio), no_env(), &secrets).expect_err(problem);
        assert!(err.to_string().contains(problem), "{ratio}: {err}");
    }
}

#[test]
fn a_pushed_pool_this_build_cannot_read_is_left_out_without_echoing_values() {
    let base = load(DEFAULT_CONFIG_TOML, no_env(), &secrets).unwrap();
    let pushed: PushedConfig = serde_json::from_value(serde_json::json!({
        "version": 2,
        "models": [{"id": "mock", "provider": "mock", "input_price_micros_per_mtok": 1,
                    "output_price_micros_per_mtok": 1}],
        "pools": [
            {"id": "newer-provider", "provider": "cohere", "api_key": "sk-do-not-echo",
             "models": ["mock"], "price_ratio_ppm": 500000},
            {"id": "mistyped", "provider": "openai", "api_key": {"sk-do-not-echo": 1},
             "models": ["mock"], "price_ratio_ppm": 500000},
            {"id": "mock-pool", "provider": "mock", "models": ["mock"], "price_ratio_ppm": 500000},
        ],
        "keys": [],
    }))
    .unwrap();
    let (valid, skipped) = base.with_pushed(pushed).unwrap();
    let ids: Vec<&str> = skipped.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["newer-provider", "mistyped"]);
    assert_eq!(valid.pools.len(), 1);
    let problems = format!("{skipped:?}");
    assert!(
        problems.contains("cohere") || problems.contains("variant"),
        "{problems}"
    );
    assert!(!problems.contains("sk-do-not-echo"), "{problems}");
}
