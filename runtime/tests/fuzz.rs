//! Property-based fuzzing of request parsing and validation: any JSON body gets `Ok` or an
//! `ApiError` (a 4xx naming a field), never a panic. CI runs few cases; `scripts/fuzz.sh` runs
//! many (PROPTEST_CASES) for minutes and records the runs in `results/fuzz.md`.

use proptest::prelude::*;
use runtime::api::generate::{parse, Kind};
use runtime::api::{parse_format, parse_inputs};
use serde_json::{Map, Value};

/// Keys the parsers look at, and a few they do not.
const KEYS: &[&str] = &[
    "input",
    "prompt",
    "messages",
    "role",
    "content",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "include_usage",
    "seed",
    "ignore_eos",
    "encoding_format",
    "dimensions",
    "model",
    "n",
    "x",
];

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just(-1i64),
            Just(0),
            Just(1),
            Just(2),
            Just(4096),
            Just(1 << 40)
        ]
        .prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::String),
        prop_oneof![
            Just("float"),
            Just("base64"),
            Just("user"),
            Just("system"),
            Just("assistant"),
            Just("")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..8).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn request_parsers_never_panic(body in json()) {
        let p = profiles::Profile::default();
        let _ = parse_inputs(&body, &p);
        let _ = parse_format(&body, 384);
        let _ = parse(&body, Kind::Completion, &p);
        let _ = parse(&body, Kind::Chat, &p);
    }

    #[test]
    fn every_refusal_names_a_4xx(body in json()) {
        let p = profiles::Profile::default();
        for r in [parse_inputs(&body, &p).err(), parse_format(&body, 384).err()]
            .into_iter()
            .chain([parse(&body, Kind::Chat, &p).err()])
            .flatten()
        {
            let s = r.status().as_u16();
            prop_assert!((400..500).contains(&s), "{s}: {r}");
            prop_assert!(!r.to_string().is_empty());
        }
    }
}
