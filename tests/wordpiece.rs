//! The fast WordPiece path gives exactly the offsets of the `tokenizers` crate.

use crate::common;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use common::{token_counter, Rng};

fn same(t: &lorag::TokenCounter, text: &str) {
    let fast = t.offsets(text).unwrap();
    let reference = t.offsets_reference(text).unwrap();
    if fast != reference {
        let i = fast
            .iter()
            .zip(&reference)
            .take_while(|(a, b)| a == b)
            .count();
        let show = |v: &[(usize, usize)]| v.get(i).map(|&(a, b)| text[a..b].to_string());
        panic!(
            "first difference at token {i}: fast {:?} vs tokenizers {:?} in {text:?}",
            show(&fast),
            show(&reference)
        );
    }
}

#[test]
fn fast_path_is_used_for_minilm() {
    assert!(token_counter().has_fast_path());
}

#[test]
fn hand_picked_cases_match_tokenizers() {
    let t = token_counter();
    for text in [
        "Hello, world! It's 3.14 o'clock -- (really?) [CLS] [sep] [Sep] a[MASK]b",
        "antidisestablishmentarianism unbelievable xyzzyqwv supercalifragilisticexpialidocious",
        &"a".repeat(150),
        &format!("{} tail", "ab".repeat(60)),
        "mid\u{0}nul tab\tform\x0cfeed vt\x0bx del\x7fete \x01\x02 \r\n CRLF",
        "café naïve Ünïcödé 日本語テキスト 中文 한국어 👍🏽 👩‍👩‍👧 \u{a0}nbsp\u{3000}ideo \u{200b}zw \u{fffd}",
        "e-mail co-operate U.S.A. $100,000.00 #hashtag @user http://x.y/z?q=1&r=2 ~tilde^caret|pipe",
        "",
        "   ",
        "ALL CAPS Mixed CaSe",
    ] {
        same(&t, text);
    }
}

#[test]
fn random_text_matches_tokenizers() {
    let t = token_counter();
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`\t\n\r\u{0}\u{7f}\u{1b}éüßçñ日本中😀\u{a0}\u{200b}\u{301}"
        .chars()
        .collect();
    let words = [
        "the",
        "ing",
        "un",
        "##",
        "[CLS]",
        "[UNK]",
        "[",
        "]",
        "word",
        "tokenization",
        "xqz",
    ];
    let mut rng = Rng(42);
    for _ in 0..2_000 {
        let len = rng.below(80);
        let mut s = String::new();
        for _ in 0..len {
            if rng.below(4) == 0 {
                s.push_str(words[rng.below(words.len())]);
            } else {
                s.push(alphabet[rng.below(alphabet.len())]);
            }
        }
        same(&t, &s);
    }
}

#[test]
fn real_prose_matches_tokenizers() {
    let t = token_counter();
    for doc in [
        include_str!("../examples/docs/handbook.md"),
        include_str!("../examples/docs/safety.html"),
        include_str!("../examples/docs/faq.txt"),
        include_str!("../README.md"),
    ] {
        same(&t, doc);
    }
}
