//! Property-based fuzzing of profile parsing, live patches and environment overrides: any
//! input gets `Ok` or a `ProfileError`, never a panic, and whatever is accepted validates and
//! round-trips. CI runs few cases; `scripts/fuzz.sh` runs many.

use profiles::{Profile, KNOBS, SEED_ENV};
use proptest::prelude::*;

fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        prop_oneof![
            Just("\"5ms\""),
            Just("\"0s\""),
            Just("\"1h\""),
            Just("\"-3ms\""),
            Just("\"1e400s\""),
            Just("\"cuda:0\""),
            Just("[\"cpu\", \"cuda:7\"]"),
            Just("[]"),
            Just("true"),
            Just("\"static\""),
            Just("\"wait\""),
            Just("\"bf16\""),
            Just("\"synthetic:tiny\""),
            Just("nan"),
            Just("inf"),
        ]
        .prop_map(str::to_string),
        "\\PC{0,16}".prop_map(|s| format!("{s:?}")),
    ]
}

fn toml_text() -> impl Strategy<Value = String> {
    let line = (
        prop_oneof![
            prop::sample::select(KNOBS).prop_map(str::to_string),
            "[a-z_]{1,12}"
        ],
        value_text(),
    )
        .prop_map(|(k, v)| format!("{k} = {v}"));
    prop_oneof![
        prop::collection::vec(line, 0..10).prop_map(|l| l.join("\n")),
        "\\PC{0,200}",
    ]
}

fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,12}",
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| v.to_string()),
        Just("0.1".to_string()),
        Just("1e-12".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn accepted_profiles_validate_and_round_trip(text in toml_text()) {
        if let Ok(p) = Profile::from_toml_str(&text) {
            if p.validate().is_ok() {
                let back = Profile::from_toml_str(&p.to_toml_string());
                prop_assert_eq!(back.ok(), Some(p));
            }
        }
    }

    #[test]
    fn patches_never_panic_and_what_they_accept_is_valid(
        kv in prop::collection::vec((prop::sample::select(KNOBS), value_text()), 0..6)
    ) {
        let body = format!(
            "{{{}}}",
            kv.iter().map(|(k, v)| format!("{k:?}: {v}")).collect::<Vec<_>>().join(", ")
        );
        if let Ok(patch) = serde_json::from_str::<serde_json::Value>(&body) {
            if let Ok(next) = Profile::default().patched(&patch) {
                prop_assert!(next.validate().is_ok());
            }
        }
    }

    #[test]
    fn env_overrides_never_panic(
        vars in prop::collection::vec(
            (
                prop_oneof![
                    prop::sample::select(KNOBS)
                        .prop_map(|k| format!("BATCHTUNE_{}", k.to_uppercase())),
                    prop::sample::select(SEED_ENV).prop_map(|(v, _, _)| v.to_string()),
                    "BATCHTUNE_[A-Z_]{1,10}",
                ],
                env_value(),
            ),
            0..6,
        )
    ) {
        let mut p = Profile::default();
        if p.apply_env(vars).is_ok() {
            let _ = p.validate();
        }
    }
}
