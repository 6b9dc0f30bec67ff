//! Chat templates: the Jinja text a GGUF file stores under `tokenizer.chat_template`, rendered the way
//! Hugging Face transformers renders it (`apply_chat_template`), in a sandbox with hard limits, plus
//! built-in fallback templates for files that carry none.
//!
//! # Compatibility with transformers
//!
//! * Whitespace: `trim_blocks` and `lstrip_blocks` on, `keep_trailing_newline` off (one trailing newline of
//!   the template is dropped), as in transformers' Jinja environment; `{% break %}` / `{% continue %}` work.
//! * Variables: `messages` (a list of `{"role", "content"}` maps, in that key order), `add_generation_prompt`,
//!   `bos_token`, `eos_token`, and `tools` and `documents` set to `None` (transformers passes both, `None`
//!   when the caller has none). Anything else is undefined.
//! * Functions: `raise_exception(message)` fails the render with [`TemplateError::Render`] carrying exactly
//!   `message`; `strftime_now(format)` formats a fixed instant, the Unix epoch (1970-01-01 00:00:00 UTC, a
//!   Thursday), so a prompt never depends on the clock (`strftime_now("%d %b %Y")` gives `01 Jan 1970`);
//!   `namespace(...)`, `range(...)`, `dict(...)`.
//! * Filters: minijinja's built-ins, and `tojson` as transformers defines it (`json.dumps` with
//!   `ensure_ascii=False`, `indent`, `separators`, `sort_keys`; no HTML escaping). Python string and dict
//!   methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, ...) come from minijinja-contrib's pycompat.
//! * Output of `None`, `True` and `False` (in `{{ }}` and with `~`) is spelled as Python spells it.
//! * transformers' `{% generation %}` ... `{% endgeneration %}` markers (assistant-mask tracking) render their
//!   body unchanged.
//!
//! # Sandbox and limits
//!
//! The engine has no loader: `{% include %}`, `{% import %}`, `{% from %}` and `{% extends %}` are rejected
//! when the template is compiled, and a template reaches nothing but its own variables (no files, no
//! environment, no clock, no `debug()`). Limits ([`TemplateLimits`] and the sandbox's own):
//!
//! * source size (`max_source_bytes`), checked first;
//! * syntax depth: before parsing, expressions deeper than 64 (counted on the tokens: operators and
//!   brackets) and block tags nested deeper than 32 are refused, because minijinja's parser, compiler and
//!   syntax-tree drop recurse on the tree (its own bracket limit does not cover chains like `a ~ b ~ ...`);
//! * fuel (`fuel`): every executed VM instruction costs fuel, so any loop or recursion ends;
//! * recursion: macro calls, `loop()` recursion and nested blocks are limited (minijinja's recursion limit,
//!   256: 64 nested macro calls); together with the syntax depth this fits a 1 MiB stack (wasm's default);
//! * output (`max_output_bytes`), checked on the final text.
//!
//! Memory is bounded too, by a rewrite of the compiled VM program: every operation that can make a value
//! larger than its inputs goes through a check. `~`, `+` and `*` (string and list repetition) are sized
//! *before* they run; every filter, test, function, method and macro call, list or map literal, slice,
//! `{% set %}` block and namespace assignment is measured after it runs; filters and methods that can amplify
//! (`replace`, `join`, `indent`, `format`, `batch`, `slice`, `tojson`, `map`) are sized before they run;
//! all text written, including text captured by macros and `{% set %}` blocks, goes through one counter. The
//! constant expressions minijinja's compiler folds while compiling (`'x' * 100000000`) are sized on the
//! syntax tree before it compiles. With `V = max_output_bytes + 64 KiB`:
//!
//! * no value built by the template may measure more than `V` (a value's measure is its string bytes plus
//!   16 per value, nested values included, so a shared reference counts every time it appears: a lazy
//!   `[s] * 1000` measures 1000 copies of `s`); values nest at most 32 deep, and a namespace cannot be
//!   stored in a namespace (no cycles). So `range(n)` works up to n of about 69,000 by default;
//! * the bytes of all values built, all values scanned by filters, tests, `in` and string indexing, and all
//!   text written during one render add up to at most `32 * V` (the work budget, about 34 MiB by default;
//!   a 50-message, 900 KB conversation uses 3 to 7 MB of it with the templates tested here).
//!
//! Past either bound the render stops with [`TemplateError::Limit`]. Not bounded by these checks: the inputs
//! themselves (the caller's messages, bos/eos tokens), and the transient result of the one operation that
//! crosses a bound (at most a small multiple of `V`, e.g. `escape` of a `V`-byte string before it is
//! measured). Comparisons (`==`, `<`) are not charged to the work budget; their cost is bounded by fuel
//! times `V`.
//!
//! The rewrite uses minijinja's `unstable_machinery` API (parser, code generator, instructions, VM), which
//! has no semver guarantee: the dependency is pinned to one minijinja version.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use minijinja::machinery::{
    ast, make_string_output, parse, tokenize, CodeGenerator, Instruction, Instructions, Token, Vm,
    WhitespaceConfig,
};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{from_args, Enumerator, Object, ObjectRepr, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State};

pub use crate::prompt::Message;

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// The template does not parse, or uses something the sandbox does not offer (an unknown filter or test,
    /// `include`, `import`, `extends`).
    Syntax(String),
    /// The template failed while rendering (`raise_exception`, a type error, an unknown variable's
    /// attribute, ...). For `raise_exception` the text is exactly the template's message.
    Render(String),
    /// A limit of [`TemplateLimits`] or of the sandbox was reached.
    Limit(String),
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Syntax(m) => write!(f, "chat template syntax error: {m}"),
            TemplateError::Render(m) => write!(f, "chat template error: {m}"),
            TemplateError::Limit(m) => write!(f, "chat template limit exceeded: {m}"),
        }
    }
}

impl std::error::Error for TemplateError {}

/// Hard limits for compiling and rendering one template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateLimits {
    /// Largest template source accepted, in bytes (default 64 KiB).
    pub max_source_bytes: usize,
    /// VM instructions one render may execute (default 200,000; real templates use 20 to 70 per message
    /// here, so a 50-message conversation needs a few thousand).
    pub fuel: u64,
    /// Largest rendered prompt, in bytes (default 1 MiB). Also sets the value and work bounds described in
    /// the module documentation.
    pub max_output_bytes: usize,
}

impl Default for TemplateLimits {
    fn default() -> Self {
        TemplateLimits {
            max_source_bytes: 64 * 1024,
            fuel: 200_000,
            max_output_bytes: 1024 * 1024,
        }
    }
}

/// Built-in templates, for files without `tokenizer.chat_template`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// ChatML (`<|im_start|>role\n...<|im_end|>\n`): Qwen, SmolLM and many others. No default system prompt.
    ChatMl,
    /// Llama 3 (`<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`), BOS first.
    Llama3,
    /// Gemma (`<start_of_turn>user\n...<end_of_turn>\n`, `model` for the assistant), BOS first; a system
    /// message is prepended to the first user turn, as Gemma 3's template does.
    Gemma,
    /// Llama 2 chat (`[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST]`), BOS before each user turn, EOS after
    /// each assistant turn.
    Llama2,
}

const CHATML: &str = "{%- for message in messages -%}\n\
{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}\n\
{%- endfor -%}\n\
{%- if add_generation_prompt -%}\n\
{{ '<|im_start|>assistant\\n' }}\n\
{%- endif -%}\n";

const LLAMA3: &str = "{%- if messages -%}{{ bos_token }}{%- endif -%}\n\
{%- for message in messages -%}\n\
{{ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ message['content'] | trim ~ '<|eot_id|>' }}\n\
{%- endfor -%}\n\
{%- if add_generation_prompt -%}\n\
{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n\
{%- endif -%}\n";

const GEMMA: &str = "{{- bos_token -}}\n\
{%- if messages and messages[0]['role'] == 'system' -%}\n\
{%- set prefix = messages[0]['content'] | trim ~ '\\n\\n' -%}\n\
{%- set turns = messages[1:] -%}\n\
{%- else -%}\n\
{%- set prefix = '' -%}\n\
{%- set turns = messages -%}\n\
{%- endif -%}\n\
{%- for message in turns -%}\n\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n\
{{ '<start_of_turn>' ~ role ~ '\\n' ~ (prefix if loop.first else '') ~ message['content'] | trim ~ '<end_of_turn>\\n' }}\n\
{%- endfor -%}\n\
{%- if add_generation_prompt -%}\n\
{{ '<start_of_turn>model\\n' }}\n\
{%- endif -%}\n";

const LLAMA2: &str = "{%- if messages and messages[0]['role'] == 'system' -%}\n\
{%- set system = messages[0]['content'] | trim -%}\n\
{%- set turns = messages[1:] -%}\n\
{%- else -%}\n\
{%- set system = '' -%}\n\
{%- set turns = messages -%}\n\
{%- endif -%}\n\
{%- for message in turns -%}\n\
{%- if message['role'] == 'assistant' -%}\n\
{{ ' ' ~ message['content'] | trim ~ ' ' ~ eos_token }}\n\
{%- else -%}\n\
{%- set text = message['content'] | trim -%}\n\
{%- if loop.first and system -%}\n\
{%- set text = '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ text -%}\n\
{%- endif -%}\n\
{{ bos_token ~ '[INST] ' ~ text ~ ' [/INST]' }}\n\
{%- endif -%}\n\
{%- endfor -%}\n";

impl Builtin {
    /// The template's Jinja source.
    pub fn source(self) -> &'static str {
        match self {
            Builtin::ChatMl => CHATML,
            Builtin::Llama3 => LLAMA3,
            Builtin::Gemma => GEMMA,
            Builtin::Llama2 => LLAMA2,
        }
    }

    /// The built-in template for a GGUF `general.architecture`, where the architecture settles it.
    /// `"llama"` gives `None`: Llama 2, Llama 3 and many fine-tunes (SmolLM: ChatML) share it, so the caller
    /// decides from the vocabulary.
    pub fn for_arch(arch: &str) -> Option<Builtin> {
        match arch {
            "qwen" | "qwen2" | "qwen2moe" | "qwen3" | "qwen3moe" => Some(Builtin::ChatMl),
            "gemma" | "gemma2" | "gemma3" => Some(Builtin::Gemma),
            _ => None,
        }
    }
}

/// The name templates are compiled under (it shows in error messages).
const TEMPLATE_NAME: &str = "chat_template";
/// Measure of one value besides its string bytes (a list item, a map key or value, a number).
const NODE: usize = 16;
/// Deepest nesting of lists, maps and namespaces a template may build.
const MAX_DEPTH: usize = 32;
/// Added to `max_output_bytes` to give the largest value a template may build.
const VALUE_SLACK: usize = 64 * 1024;
/// The work budget, in multiples of the largest value.
const WORK_FACTOR: usize = 32;
/// minijinja's recursion limit: each nested loop or `if` costs 1, each macro call 4 (so 64 nested macro
/// calls), which stays within a 1 MiB stack.
const RECURSION_LIMIT: usize = 256;
/// Name of the per-render work counter among the render's temporaries.
const BUDGET_KEY: &str = "lorag:budget";

// The checks are global functions named with a ':', which no template can write, so a template can
// neither call nor shadow them.
const HOOK_CHECK: &str = "lorag:check";
const HOOK_CONCAT: &str = "lorag:concat";
const HOOK_ADD: &str = "lorag:add";
const HOOK_MUL: &str = "lorag:mul";
const HOOK_IN: &str = "lorag:in";
const HOOK_GET_ITEM: &str = "lorag:getitem";
const HOOK_SLICE: &str = "lorag:slice";
const HOOK_SET_ATTR: &str = "lorag:setattr";

macro_rules! hook_table {
    ($prefix:literal: $($name:literal),* $(,)?) => {
        &[$(($name, concat!($prefix, $name))),*]
    };
}

/// minijinja's built-in filters (with `tojson` replaced), each with the name of the check that runs it.
const FILTERS: &[(&str, &str)] = hook_table!("lorag:filter:":
    "abs", "attr", "batch", "bool", "capitalize", "chain", "count", "d", "default", "dictsort", "e",
    "escape", "first", "float", "format", "groupby", "indent", "int", "items", "join", "last", "length",
    "lines", "list", "lower", "map", "max", "min", "pprint", "reject", "rejectattr", "replace", "reverse",
    "round", "safe", "select", "selectattr", "slice", "sort", "split", "string", "sum", "title", "tojson",
    "trim", "unique", "upper", "zip",
);

/// minijinja's built-in tests, each with the name of the check that runs it.
const TESTS: &[(&str, &str)] = hook_table!("lorag:test:":
    "undefined", "defined", "none", "safe", "escaped", "boolean", "odd", "even", "divisibleby", "number",
    "integer", "int", "float", "string", "sequence", "iterable", "mapping", "startingwith", "endingwith",
    "lower", "upper", "sameas", "eq", "equalto", "==", "ne", "!=", "lt", "lessthan", "<", "le", "<=", "gt",
    "greaterthan", ">", "ge", ">=", "in", "true", "false", "filter", "test",
);

/// A compiled chat template with its sandbox.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    limits: TemplateLimits,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_bytes", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("limits", &self.limits)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile once. bos_token / eos_token are exposed to the template as variables (HF does this).
    ///
    /// The source is checked against `limits.max_source_bytes`, parsed and sandboxed here, so a template
    /// that cannot work fails now rather than at the first render.
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        limits: TemplateLimits,
    ) -> Result<ChatTemplate, TemplateError> {
        if source.len() > limits.max_source_bytes {
            return Err(TemplateError::Limit(format!(
                "the template has {} bytes, more than the {} allowed",
                source.len(),
                limits.max_source_bytes
            )));
        }
        let source = rewrite_generation_tags(source);
        compile(&source, Caps::new(limits))?;
        Ok(ChatTemplate {
            env: sandbox_env(limits),
            source,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            limits,
        })
    }

    /// A built-in template, with the default limits.
    pub fn builtin(b: Builtin, bos_token: &str, eos_token: &str) -> ChatTemplate {
        ChatTemplate::new(b.source(), bos_token, eos_token, TemplateLimits::default())
            .expect("the built-in templates compile")
    }

    /// Render; add_generation_prompt as in HF. Messages' roles are "system" | "user" | "assistant" (others
    /// passed through).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with_usage(messages, add_generation_prompt)
            .map(|(text, _)| text)
    }

    /// Renders, and tells how much fuel and work budget the render used.
    fn render_with_usage(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Usage), TemplateError> {
        // minijinja's compiled program borrows its source, so it is rebuilt here (the parse is cheap next to
        // the render); `new` already checked that it compiles.
        let program = compile(&self.source, Caps::new(self.limits))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_iter([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let root = Value::from_iter([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
            // transformers always passes these two, as None when the caller has none.
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ]);
        let mut text = String::new();
        let vm = Vm::new(&self.env);
        let (_, state) = vm
            .eval(
                &program.instructions,
                root,
                &program.blocks,
                &mut make_string_output(&mut text),
                AutoEscape::None,
            )
            .map_err(|e| render_error(&e, self.limits.fuel))?;
        let usage = Usage {
            fuel: state.fuel_levels().map_or(0, |(used, _)| used),
            work: state
                .get_temp(BUDGET_KEY)
                .and_then(|b| b.downcast_object_ref::<Budget>().map(Budget::used))
                .unwrap_or(0),
        };
        if text.len() > self.limits.max_output_bytes {
            return Err(TemplateError::Limit(format!(
                "the rendered prompt has {} bytes, more than the {} allowed",
                text.len(),
                self.limits.max_output_bytes
            )));
        }
        Ok((text, usage))
    }
}

/// What one render used (read by the tests, which size the defaults with it).
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(not(test), allow(dead_code))]
struct Usage {
    fuel: u64,
    work: usize,
}

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` markers by `{% if true %}` /
/// `{% endif %}` (same whitespace control), so their body renders unchanged.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        match generation_tag(tag) {
            Some((replacement, consumed)) => {
                out.push_str(&replacement);
                rest = &tag[consumed..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` (which starts with `{%`) is a `generation` or `endgeneration` tag: its replacement, and its length.
fn generation_tag(tag: &str) -> Option<(String, usize)> {
    let marker = |s: &str| match s.chars().next() {
        Some(c @ ('-' | '+')) => Some(c),
        _ => None,
    };
    let inner = &tag[2..];
    let open = marker(inner);
    let inner = inner[open.map_or(0, char::len_utf8)..].trim_start();
    let (replacement, after) = if let Some(after) = inner.strip_prefix("endgeneration") {
        ("endif", after)
    } else if let Some(after) = inner.strip_prefix("generation") {
        ("if true", after)
    } else {
        return None;
    };
    let after = after.trim_start();
    let close = marker(after);
    let after = after[close.map_or(0, char::len_utf8)..].strip_prefix("%}")?;
    let mut replacement = format!(
        "{{%{} {replacement} ",
        open.map(String::from).unwrap_or_default()
    );
    if let Some(c) = close {
        replacement.push(c);
    }
    replacement.push_str("%}");
    Some((replacement, tag.len() - after.len()))
}

/// A template compiled and rewritten for the sandbox.
struct Program<'s> {
    instructions: Instructions<'s>,
    blocks: BTreeMap<&'s str, Instructions<'s>>,
}

/// Jinja's standard delimiters.
// `SyntaxConfig` is a unit struct unless minijinja's `custom_syntax` feature is on; `default()` works either way.
#[allow(clippy::default_constructed_unit_structs)]
fn syntax() -> SyntaxConfig {
    SyntaxConfig::default()
}

/// Parses `source` with transformers' whitespace settings, checks what the compiler would fold, compiles,
/// and rewrites the program for the sandbox.
fn compile(source: &str, caps: Caps) -> Result<Program<'_>, TemplateError> {
    let whitespace = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    check_nesting(source, whitespace)?;
    let ast = parse(source, TEMPLATE_NAME, syntax(), whitespace).map_err(|e| {
        let text = e.to_string();
        if text.contains("maximum recursion") {
            TemplateError::Limit(text)
        } else {
            TemplateError::Syntax(text)
        }
    })?;
    FoldCheck { cap: caps.value }.stmt(&ast)?;
    let mut generator = CodeGenerator::new(TEMPLATE_NAME, source);
    generator.compile_stmt(&ast);
    let (instructions, compiled_blocks) = generator.finish();
    let instructions = sandbox(&instructions)?;
    let mut blocks = BTreeMap::new();
    for (name, block) in &compiled_blocks {
        blocks.insert(*name, sandbox(block)?);
    }
    Ok(Program {
        instructions,
        blocks,
    })
}

/// Deepest expression a template may write, as [`check_nesting`] counts it.
const MAX_EXPRESSION_DEPTH: usize = 64;
/// Deepest nesting of block tags (`if`, `for`, `macro`, ...).
const MAX_BLOCK_DEPTH: usize = 32;

/// Bounds the depth of the syntax tree before the parser builds it: minijinja's parser limits bracket
/// nesting, but chains (`a ~ b ~ c ...`, `x|f|g ...`, `not not ...`, `x.a.b ...`) nest the tree one level
/// per operator, and the parser, the compiler and the tree's drop all recurse on it. For each `{{ }}` and
/// `{% %}` tag this counts, per bracket level, the operators since the last `,` or `:`; the sum over the open
/// levels bounds the tree depth at that point. Block tags are counted by nesting. Lexing errors are left
/// to the parser.
fn check_nesting(source: &str, whitespace: WhitespaceConfig) -> Result<(), TemplateError> {
    let mut blocks = 0usize;
    let mut levels: Vec<usize> = Vec::new();
    let mut block_tag = false;
    let mut keyword: Option<&str> = None;
    let mut assigns = false;
    let mut first = false;
    for token in tokenize(source, false, syntax(), whitespace) {
        let Ok((token, _)) = token else { return Ok(()) };
        match token {
            Token::VariableStart | Token::BlockStart => {
                levels.clear();
                levels.push(0);
                block_tag = matches!(token, Token::BlockStart);
                keyword = None;
                assigns = false;
                first = true;
                continue;
            }
            Token::VariableEnd | Token::BlockEnd => {
                if block_tag {
                    match keyword {
                        Some(
                            "if" | "for" | "macro" | "call" | "filter" | "with" | "block"
                            | "autoescape",
                        ) => blocks += 1,
                        Some("set") if !assigns => blocks += 1,
                        Some(k) if k.starts_with("end") => blocks = blocks.saturating_sub(1),
                        _ => {}
                    }
                    if blocks > MAX_BLOCK_DEPTH {
                        return Err(TemplateError::Limit(format!(
                            "block tags may not be nested more than {MAX_BLOCK_DEPTH} deep"
                        )));
                    }
                }
                levels.clear();
                continue;
            }
            Token::TemplateData(_) => continue,
            _ => {}
        }
        if first {
            first = false;
            if let Token::Ident(k) = token {
                keyword = Some(k);
                continue;
            }
        }
        let Some(top) = levels.last_mut() else {
            continue;
        };
        match token {
            Token::Ident("and" | "or" | "not" | "in" | "is" | "if" | "else") => *top += 1,
            Token::Ident(_)
            | Token::Str(_)
            | Token::String(_)
            | Token::Int(_)
            | Token::Int128(_)
            | Token::Float(_) => {}
            Token::Comma | Token::Colon => *top = 0,
            Token::ParenOpen | Token::BracketOpen | Token::BraceOpen => {
                *top += 1;
                levels.push(0);
            }
            Token::ParenClose | Token::BracketClose | Token::BraceClose => {
                if levels.len() > 1 {
                    levels.pop();
                }
            }
            Token::Assign => {
                assigns = true;
                *top += 1;
            }
            _ => *top += 1,
        }
        let depth: usize = levels.iter().map(|n| n + 1).sum();
        if depth > MAX_EXPRESSION_DEPTH {
            return Err(TemplateError::Limit(format!(
                "an expression of the template nests more than {MAX_EXPRESSION_DEPTH} deep"
            )));
        }
    }
    Ok(())
}

/// minijinja's compiler folds constant subexpressions (`'x' * 100000000`, `'a' ~ 'b'`, `[1] * n`) into values
/// while it compiles, before any check of the rewritten program can run. This walk bounds the measure of
/// every value the compiler would fold and rejects the template past the value cap.
struct FoldCheck {
    cap: usize,
}

/// Constant operands at most this large are evaluated to learn a repetition count.
const FOLD_PROBE: usize = 4096;

impl FoldCheck {
    fn stmts(&self, stmts: &[ast::Stmt<'_>]) -> Result<(), TemplateError> {
        stmts.iter().try_for_each(|s| self.stmt(s))
    }

    fn exprs<'a>(
        &self,
        exprs: impl IntoIterator<Item = &'a ast::Expr<'a>>,
    ) -> Result<(), TemplateError> {
        for e in exprs {
            self.expr(e)?;
        }
        Ok(())
    }

    fn args(&self, args: &[ast::CallArg<'_>]) -> Result<(), TemplateError> {
        for arg in args {
            match arg {
                ast::CallArg::Pos(e)
                | ast::CallArg::Kwarg(_, e)
                | ast::CallArg::PosSplat(e)
                | ast::CallArg::KwargSplat(e) => self.expr(e)?,
            };
        }
        Ok(())
    }

    fn call(&self, call: &ast::Call<'_>) -> Result<(), TemplateError> {
        self.expr(&call.expr)?;
        self.args(&call.args)
    }

    fn macro_decl(&self, m: &ast::Macro<'_>) -> Result<(), TemplateError> {
        self.exprs(&m.args)?;
        self.exprs(&m.defaults)?;
        self.stmts(&m.body)
    }

    fn stmt(&self, stmt: &ast::Stmt<'_>) -> Result<(), TemplateError> {
        match stmt {
            ast::Stmt::Template(t) => self.stmts(&t.children),
            ast::Stmt::EmitExpr(e) => self.expr(&e.expr).map(drop),
            ast::Stmt::EmitRaw(_) | ast::Stmt::Continue(_) | ast::Stmt::Break(_) => Ok(()),
            ast::Stmt::ForLoop(f) => {
                self.exprs([&f.target, &f.iter])?;
                self.exprs(&f.filter_expr)?;
                self.stmts(&f.body)?;
                self.stmts(&f.else_body)
            }
            ast::Stmt::IfCond(i) => {
                self.expr(&i.expr)?;
                self.stmts(&i.true_body)?;
                self.stmts(&i.false_body)
            }
            ast::Stmt::WithBlock(w) => {
                for (target, value) in &w.assignments {
                    self.exprs([target, value])?;
                }
                self.stmts(&w.body)
            }
            ast::Stmt::Set(s) => self.exprs([&s.target, &s.expr]),
            ast::Stmt::SetBlock(s) => {
                self.expr(&s.target)?;
                self.exprs(&s.filter)?;
                self.stmts(&s.body)
            }
            ast::Stmt::AutoEscape(a) => {
                self.expr(&a.enabled)?;
                self.stmts(&a.body)
            }
            ast::Stmt::FilterBlock(f) => {
                self.expr(&f.filter)?;
                self.stmts(&f.body)
            }
            ast::Stmt::Block(b) => self.stmts(&b.body),
            ast::Stmt::Import(i) => self.exprs([&i.expr, &i.name]),
            ast::Stmt::FromImport(f) => {
                self.expr(&f.expr)?;
                for (name, alias) in &f.names {
                    self.expr(name)?;
                    self.exprs(alias)?;
                }
                Ok(())
            }
            ast::Stmt::Extends(e) => self.expr(&e.name).map(drop),
            ast::Stmt::Include(i) => self.expr(&i.name).map(drop),
            ast::Stmt::Macro(m) => self.macro_decl(m),
            ast::Stmt::CallBlock(c) => {
                self.call(&c.call)?;
                self.macro_decl(&c.macro_decl)
            }
            ast::Stmt::Do(d) => self.call(&d.call),
        }
    }

    /// Checks `expr` and everything in it; gives the measure bound of its folded value, `None` where the
    /// compiler does not fold it.
    fn expr(&self, expr: &ast::Expr<'_>) -> Result<Option<usize>, TemplateError> {
        let bound = match expr {
            ast::Expr::Var(_) => None,
            ast::Expr::Const(c) => Some(literal_measure(&c.value)),
            ast::Expr::Slice(s) => {
                self.expr(&s.expr)?;
                self.exprs(s.start.iter().chain(&s.stop).chain(&s.step))?;
                None
            }
            ast::Expr::UnaryOp(u) => self.expr(&u.expr)?.map(|_| NODE),
            ast::Expr::BinOp(b) => match (self.expr(&b.left)?, self.expr(&b.right)?) {
                (Some(left), Some(right)) => Some(binop_bound(b, left, right)),
                _ => None,
            },
            ast::Expr::Compare(c) => {
                let mut constant = self.expr(&c.expr)?.is_some();
                for op in &c.ops {
                    constant &= self.expr(&op.expr)?.is_some();
                }
                constant.then_some(NODE)
            }
            ast::Expr::IfExpr(i) => {
                self.exprs([&i.test_expr, &i.true_expr])?;
                self.exprs(&i.false_expr)?;
                None
            }
            ast::Expr::Filter(f) => {
                self.exprs(&f.expr)?;
                self.args(&f.args)?;
                None
            }
            ast::Expr::Test(t) => {
                self.expr(&t.expr)?;
                self.args(&t.args)?;
                None
            }
            ast::Expr::GetAttr(g) => self.expr(&g.expr)?.and(None),
            ast::Expr::GetItem(g) => {
                self.exprs([&g.expr, &g.subscript_expr])?;
                None
            }
            ast::Expr::Call(c) => {
                self.call(c)?;
                None
            }
            ast::Expr::List(l) => {
                let mut total = Some(NODE);
                for item in &l.items {
                    let size = self.expr(item)?;
                    total = match (total, item, size) {
                        (Some(t), ast::Expr::Const(_), Some(s)) => Some(t.saturating_add(s)),
                        _ => None,
                    };
                }
                total
            }
            ast::Expr::Map(m) => {
                let mut total = Some(NODE);
                for item in m.keys.iter().chain(&m.values) {
                    let size = self.expr(item)?;
                    total = match (total, item, size) {
                        (Some(t), ast::Expr::Const(_), Some(s)) => Some(t.saturating_add(s)),
                        _ => None,
                    };
                }
                total
            }
        };
        match bound {
            Some(size) if size > self.cap => Err(TemplateError::Limit(format!(
                "a constant expression of the template would exceed {} bytes",
                self.cap
            ))),
            _ => Ok(bound),
        }
    }
}

/// The measure of a literal (small: it is written in the source).
fn literal_measure(value: &Value) -> usize {
    let mut meter = Meter::new(usize::MAX);
    meter.measure(value, 0).map_or(usize::MAX, |()| meter.used)
}

/// A bound of the measure of a folded binary operation, from its operands' bounds.
fn binop_bound(op: &ast::BinOp<'_>, left: usize, right: usize) -> usize {
    match op.op {
        ast::BinOpKind::Add | ast::BinOpKind::Concat => left.saturating_add(right),
        ast::BinOpKind::ScAnd | ast::BinOpKind::ScOr => left.max(right),
        ast::BinOpKind::Mul => {
            let probe = |e: &ast::Expr<'_>, size: usize| {
                if size <= FOLD_PROBE {
                    e.as_const()
                } else {
                    None
                }
            };
            let count = |v: &Option<Value>| {
                v.as_ref()
                    .filter(|v| v.kind() == ValueKind::Number)
                    .and_then(Value::as_usize)
            };
            let (l, r) = (probe(&op.left, left), probe(&op.right, right));
            let number =
                |v: &Option<Value>| v.as_ref().is_some_and(|v| v.kind() == ValueKind::Number);
            if number(&l) && number(&r) {
                NODE
            } else if let Some(n) = count(&r) {
                left.saturating_mul(n)
            } else if let Some(n) = count(&l) {
                right.saturating_mul(n)
            } else {
                NODE
            }
        }
        _ => NODE,
    }
}

fn hook_for(table: &[(&'static str, &'static str)], name: &str) -> Option<&'static str> {
    let name: String = name.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    table.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
}

/// Rewrites a compiled program so that every value-building operation passes a check (see the module
/// documentation). Jump targets are renumbered for the inserted instructions; line numbers are kept.
fn sandbox<'s>(old: &Instructions<'s>) -> Result<Instructions<'s>, TemplateError> {
    let mut new = Instructions::new(old.name(), old.source());
    let mut index = Vec::with_capacity(old.len() + 1);
    for idx in 0..old.len() {
        let idx = idx as u32;
        index.push(new.len() as u32);
        let line = old.get_line(idx).and_then(|l| u16::try_from(l).ok());
        let mut emit = |instr: Instruction<'s>| match line {
            Some(line) => new.add_with_line(instr, line),
            None => new.add(instr),
        };
        let Some(instr) = old.get(idx) else { break };
        match instr {
            Instruction::EmitRaw(text) => {
                emit(Instruction::LoadConst(Value::from(*text)));
                emit(Instruction::Emit);
            }
            Instruction::StringConcat => {
                emit(Instruction::CallFunction(HOOK_CONCAT, Some(2)));
            }
            Instruction::Add | Instruction::Mul | Instruction::In | Instruction::GetItem => {
                let hook = match instr {
                    Instruction::Add => HOOK_ADD,
                    Instruction::Mul => HOOK_MUL,
                    Instruction::In => HOOK_IN,
                    _ => HOOK_GET_ITEM,
                };
                emit(Instruction::CallFunction(hook, Some(2)));
                emit(Instruction::UnpackList(2));
                emit(instr.clone());
            }
            Instruction::Slice => {
                emit(Instruction::CallFunction(HOOK_SLICE, Some(4)));
                emit(Instruction::UnpackList(4));
                emit(Instruction::Slice);
                emit(Instruction::CallFunction(HOOK_CHECK, Some(1)));
            }
            Instruction::SetAttr(name) => {
                emit(Instruction::LoadConst(Value::from(*name)));
                emit(Instruction::CallFunction(HOOK_SET_ATTR, Some(3)));
                emit(Instruction::DiscardTop);
            }
            Instruction::ApplyFilter(name, args, _) => {
                let hook = hook_for(FILTERS, name)
                    .ok_or_else(|| TemplateError::Syntax(format!("unknown filter `{name}`")))?;
                emit(Instruction::CallFunction(hook, *args));
            }
            Instruction::PerformTest(name, args, _) => {
                let hook = hook_for(TESTS, name)
                    .ok_or_else(|| TemplateError::Syntax(format!("unknown test `{name}`")))?;
                emit(Instruction::CallFunction(hook, *args));
            }
            Instruction::CallFunction(..)
            | Instruction::CallMethod(..)
            | Instruction::CallObject(..)
            | Instruction::EndCapture
            | Instruction::BuildList(..)
            | Instruction::BuildMap(..) => {
                emit(instr.clone());
                emit(Instruction::CallFunction(HOOK_CHECK, Some(1)));
            }
            Instruction::Include(..) | Instruction::LoadBlocks | Instruction::ExportLocals => {
                return Err(TemplateError::Syntax(
                    "include, import and extends are not available in chat templates".into(),
                ));
            }
            _ => {
                emit(instr.clone());
            }
        }
    }
    index.push(new.len() as u32);
    let remap = |target: &mut u32| -> Result<(), TemplateError> {
        *target = *index
            .get(*target as usize)
            .ok_or_else(|| TemplateError::Syntax("jump outside the program".into()))?;
        Ok(())
    };
    for idx in 0..new.len() {
        if let Some(
            Instruction::Jump(target)
            | Instruction::JumpIfFalse(target)
            | Instruction::JumpIfFalseOrPop(target)
            | Instruction::JumpIfTrueOrPop(target)
            | Instruction::Iterate(target)
            | Instruction::BuildMacro(_, target, _),
        ) = new.get_mut(idx as u32)
        {
            remap(target)?;
        }
    }
    Ok(new)
}

/// The derived bounds of one template's sandbox.
#[derive(Clone, Copy, Debug)]
struct Caps {
    /// Largest measure of one value.
    value: usize,
    /// Work budget of one render.
    work: usize,
}

impl Caps {
    fn new(limits: TemplateLimits) -> Caps {
        let value = limits.max_output_bytes.saturating_add(VALUE_SLACK);
        Caps {
            value,
            work: value.saturating_mul(WORK_FACTOR),
        }
    }
}

/// A limit error, told apart from other errors when the render fails.
#[derive(Debug)]
struct LimitHit(String);

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitHit {}

/// The message of `raise_exception`.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn limit(message: impl Into<String>) -> Error {
    let message = message.into();
    Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(LimitHit(message))
}

fn render_error(err: &Error, fuel: u64) -> TemplateError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(hit) = e.downcast_ref::<LimitHit>() {
            return TemplateError::Limit(hit.0.clone());
        }
        if let Some(raised) = e.downcast_ref::<Raised>() {
            return TemplateError::Render(raised.0.clone());
        }
        cause = e.source();
    }
    let text = err.to_string();
    if err.kind() == ErrorKind::OutOfFuel {
        TemplateError::Limit(format!(
            "the template ran out of fuel ({fuel} instructions): {text}"
        ))
    } else if [
        "recursion limit exceeded",
        "range has too many elements",
        "repeated string is too large",
    ]
    .iter()
    .any(|m| text.contains(m))
    {
        TemplateError::Limit(text)
    } else {
        TemplateError::Render(text)
    }
}

/// The work counter of one render, kept among the render's temporaries.
#[derive(Debug, Default)]
struct Budget {
    used: AtomicUsize,
}

impl Object for Budget {}

impl Budget {
    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

fn charge(state: &State, caps: Caps, amount: usize) -> Result<(), Error> {
    let budget = state.get_or_set_temp_object(BUDGET_KEY, Budget::default);
    let used = budget.used().saturating_add(amount);
    budget.used.store(used, Ordering::Relaxed);
    if used > caps.work {
        Err(limit(format!(
            "the render's work budget ({} bytes) is spent",
            caps.work
        )))
    } else {
        Ok(())
    }
}

/// The measure of values (see the module documentation), stopping at `cap`.
struct Meter {
    used: usize,
    cap: usize,
    found_namespace: bool,
}

impl Meter {
    fn new(cap: usize) -> Meter {
        Meter {
            used: 0,
            cap,
            found_namespace: false,
        }
    }

    fn add(&mut self, amount: usize) -> Result<(), Error> {
        self.used = self.used.saturating_add(amount);
        if self.used > self.cap {
            Err(limit(format!(
                "a value of the template would exceed {} bytes",
                self.cap
            )))
        } else {
            Ok(())
        }
    }

    fn measure(&mut self, value: &Value, depth: usize) -> Result<(), Error> {
        self.add(NODE)?;
        if let Some(s) = value.as_str() {
            return self.add(s.len());
        }
        match value.kind() {
            ValueKind::Bytes => self.add(value.as_bytes().map_or(0, <[u8]>::len)),
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
                if depth >= MAX_DEPTH {
                    return Err(limit(format!(
                        "values may not be nested more than {MAX_DEPTH} deep"
                    )));
                }
                if value.downcast_object_ref::<Namespace>().is_some() {
                    self.found_namespace = true;
                }
                let map = value.kind() == ValueKind::Map;
                for item in value.try_iter()? {
                    self.measure(&item, depth + 1)?;
                    if map {
                        self.measure(&value.get_item(&item)?, depth + 1)?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Measures `value` (at most the value cap) and charges its measure to the work budget.
fn measure_charge(state: &State, caps: Caps, value: &Value) -> Result<Meter, Error> {
    let mut meter = Meter::new(caps.value);
    meter.measure(value, 0)?;
    charge(state, caps, meter.used)?;
    Ok(meter)
}

/// Measures `value` without charging it.
fn measure(caps: Caps, value: &Value) -> Result<usize, Error> {
    let mut meter = Meter::new(caps.value);
    meter.measure(value, 0)?;
    Ok(meter.used)
}

fn ensure_fits(caps: Caps, estimate: usize) -> Result<(), Error> {
    if estimate > caps.value {
        Err(limit(format!(
            "a value of the template would exceed {} bytes",
            caps.value
        )))
    } else {
        Ok(())
    }
}

/// Python's `str()` of a value: `None`, `True`, `False`; undefined is empty.
fn py_str(value: &Value) -> Cow<'_, str> {
    if let Some(s) = value.as_str() {
        return Cow::Borrowed(s);
    }
    match value.kind() {
        ValueKind::Undefined => Cow::Borrowed(""),
        ValueKind::None => Cow::Borrowed("None"),
        ValueKind::Bool if value.is_true() => Cow::Borrowed("True"),
        ValueKind::Bool => Cow::Borrowed("False"),
        _ => Cow::Owned(value.to_string()),
    }
}

fn is_sequence(value: &Value) -> bool {
    matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// A positional argument (kwargs are not positional).
fn positional(args: &[Value], idx: usize) -> Option<&Value> {
    args.get(idx).filter(|v| !v.is_kwargs())
}

/// A keyword argument.
fn keyword(args: &[Value], name: &str) -> Option<Value> {
    args.last()
        .filter(|v| v.is_kwargs())
        .and_then(|kw| kw.get_item(&Value::from(name)).ok())
        .filter(|v| !v.is_undefined())
}

/// A string argument as minijinja's filters read it.
fn str_arg(args: &[Value], idx: usize) -> Cow<'_, str> {
    match positional(args, idx) {
        Some(v) => match v.as_str() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(v.to_string()),
        },
        None => Cow::Borrowed(""),
    }
}

fn replace_estimate(s: &str, from: &str, to: &str) -> usize {
    let count = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    s.len().saturating_add(count.saturating_mul(to.len()))
}

fn join_estimate(caps: Caps, items: &Value, separator: &str) -> Result<usize, Error> {
    let size = measure(caps, items)?;
    let count = match items.len() {
        Some(n) => n,
        None => items.try_iter()?.count(),
    };
    Ok(size.saturating_add(count.saturating_mul(separator.len())))
}

/// An upper bound of `%`-style and `{}`-style formatting: each placeholder writes at most its argument's text
/// (escaped), or a width or precision written in the format string, or one taken from an integer argument
/// where the format can take widths from arguments (`*`, or a `{` inside a `{}` field).
fn format_estimate(caps: Caps, format: &str, args: &[Value]) -> Result<usize, Error> {
    let placeholders = format.bytes().filter(|b| matches!(b, b'%' | b'{')).count();
    if placeholders == 0 {
        return Ok(format.len());
    }
    let mut widest = 0usize;
    let mut run = 0usize;
    let mut open_fields = 0usize;
    let mut dynamic_width = false;
    for b in format.bytes().chain(std::iter::once(b' ')) {
        if b.is_ascii_digit() {
            run = run.saturating_mul(10).saturating_add(usize::from(b - b'0'));
            continue;
        }
        widest = widest.max(run);
        run = 0;
        match b {
            b'*' => dynamic_width = true,
            b'{' => {
                dynamic_width |= open_fields > 0;
                open_fields += 1;
            }
            b'}' => open_fields = open_fields.saturating_sub(1),
            _ => {}
        }
    }
    let mut largest_arg = 0usize;
    let mut note_width = |v: &Value| {
        if dynamic_width && v.is_integer() {
            let n = v.as_i64().map_or(u64::MAX, i64::unsigned_abs);
            widest = widest.max(usize::try_from(n).unwrap_or(usize::MAX));
        }
    };
    for arg in args {
        largest_arg = largest_arg.max(measure(caps, arg)?);
        if arg.kind() == ValueKind::Map {
            for key in arg.try_iter()? {
                note_width(&arg.get_item(&key)?);
            }
        } else {
            note_width(arg);
        }
    }
    let per_placeholder = largest_arg
        .saturating_mul(8)
        .saturating_add(widest)
        .saturating_add(400);
    Ok(format
        .len()
        .saturating_add(placeholders.saturating_mul(per_placeholder)))
}

/// Sizes the filters that can make their result much larger than their input, before they run.
fn check_filter_arguments(caps: Caps, name: &str, args: &[Value]) -> Result<(), Error> {
    match name {
        "replace" => ensure_fits(
            caps,
            replace_estimate(&str_arg(args, 0), &str_arg(args, 1), &str_arg(args, 2)),
        ),
        "join" => {
            let items = positional(args, 0).cloned().unwrap_or(Value::UNDEFINED);
            ensure_fits(caps, join_estimate(caps, &items, &str_arg(args, 1))?)
        }
        "indent" => {
            let width = positional(args, 1)
                .cloned()
                .or_else(|| keyword(args, "width"))
                .map_or(Some(4), |w| w.as_usize());
            let Some(width) = width else { return Ok(()) };
            let text = str_arg(args, 0);
            let lines = text.matches('\n').count() + 1;
            ensure_fits(
                caps,
                text.len()
                    .saturating_add(lines.saturating_mul(width.saturating_add(1))),
            )
        }
        "batch" | "slice" => match positional(args, 1).and_then(Value::as_usize) {
            Some(count) if count > caps.value / NODE => Err(limit(format!(
                "{name}({count}) would build more than {} items",
                caps.value / NODE
            ))),
            _ => Ok(()),
        },
        "format" => {
            let rest = args.get(1..).unwrap_or(&[]);
            ensure_fits(caps, format_estimate(caps, &str_arg(args, 0), rest)?)
        }
        _ => Ok(()),
    }
}

/// Runs one filter under the sandbox: charges its input, sizes amplifying arguments, measures the result.
fn run_filter(state: &State, caps: Caps, name: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(input) = args.first() {
        measure_charge(state, caps, input)?;
    }
    check_filter_arguments(caps, name, args)?;
    let result = if name == "map" && keyword(args, "attribute").is_none() {
        map_filter(state, caps, args)?
    } else {
        state.apply_filter(name, args)?
    };
    measure_charge(state, caps, &result)?;
    Ok(result)
}

/// `map("filter", args...)`, with each application run under the sandbox.
fn map_filter(state: &State, caps: Caps, args: &[Value]) -> Result<Value, Error> {
    let (positional, kwargs): (&[Value], minijinja::value::Kwargs) = from_args(args)?;
    kwargs.assert_all_used()?;
    let (items, rest) = match positional {
        [items, rest @ ..] => (items, rest),
        [] => return Err(Error::from(ErrorKind::MissingArgument)),
    };
    let filter = rest.first().and_then(Value::as_str).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidOperation,
            "map needs a filter name or attribute=",
        )
    })?;
    let filter = FILTERS
        .iter()
        .find(|(n, _)| *n == filter)
        .map(|(n, _)| *n)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::UnknownFilter,
                format!("filter {filter} is unknown"),
            )
        })?;
    let mut out = Vec::new();
    let mut call = Vec::with_capacity(rest.len());
    let items = if items.is_undefined() {
        Value::from(Vec::<Value>::new())
    } else {
        items.clone()
    };
    for item in items.try_iter()? {
        call.clear();
        call.push(item);
        call.extend(rest[1..].iter().cloned());
        out.push(run_filter(state, caps, filter, &call)?);
    }
    Ok(Value::from(out))
}

/// `namespace()`: a mutable map for `{% set ns.attr = ... %}`, in insertion order.
#[derive(Debug, Default)]
struct Namespace {
    data: Mutex<Vec<(Arc<str>, Value)>>,
}

impl Object for Namespace {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        data.iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        Enumerator::Values(data.iter().map(|(k, _)| Value::from(k.clone())).collect())
    }
}

impl Namespace {
    fn set(&self, key: &str, value: Value) {
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        match data.iter_mut().find(|(k, _)| &**k == key) {
            Some(slot) => slot.1 = value,
            None => data.push((Arc::from(key), value)),
        }
    }
}

/// Checks a value about to be stored in a namespace (no namespaces inside namespaces: no cycles).
fn check_namespace_value(state: &State, caps: Caps, value: &Value) -> Result<(), Error> {
    if measure_charge(state, caps, value)?.found_namespace {
        return Err(limit("a namespace cannot be stored inside a namespace"));
    }
    Ok(())
}

/// The functions the sandbox adds, and the checks the rewritten program calls.
#[derive(Debug, Clone, Copy)]
enum HookKind {
    Check,
    Concat,
    Add,
    Mul,
    In,
    GetItem,
    Slice,
    SetAttr,
    Filter(&'static str),
    Test(&'static str),
    Namespace,
    RaiseException,
    StrftimeNow,
}

/// A check's arguments, to be put back on the stack by `UnpackList` (which pushes the first item last).
fn restack(mut args: Vec<Value>) -> Value {
    args.reverse();
    Value::from(args)
}

#[derive(Debug)]
struct Hook {
    kind: HookKind,
    caps: Caps,
}

impl Object for Hook {
    fn call(self: &Arc<Self>, state: &State<'_, '_>, args: &[Value]) -> Result<Value, Error> {
        let caps = self.caps;
        let arg = |i: usize| args.get(i).cloned().unwrap_or(Value::UNDEFINED);
        match self.kind {
            HookKind::Check => {
                let value = arg(0);
                measure_charge(state, caps, &value)?;
                Ok(value)
            }
            HookKind::Concat => {
                let (a, b) = (arg(0), arg(1));
                let mut meter = Meter::new(caps.value);
                meter.measure(&a, 0)?;
                meter.measure(&b, 0)?;
                charge(state, caps, meter.used)?;
                let mut text = py_str(&a).into_owned();
                text.push_str(&py_str(&b));
                ensure_fits(caps, text.len())?;
                Ok(Value::from(text))
            }
            HookKind::Add => {
                let (a, b) = (arg(0), arg(1));
                if (a.as_str().is_some() && b.as_str().is_some())
                    || (is_sequence(&a) && is_sequence(&b))
                {
                    let mut meter = Meter::new(caps.value);
                    meter.measure(&a, 0)?;
                    meter.measure(&b, 0)?;
                    charge(state, caps, meter.used)?;
                }
                Ok(restack(vec![a, b]))
            }
            HookKind::Mul => {
                let (a, b) = (arg(0), arg(1));
                let repeated = match (b.as_usize(), a.as_usize()) {
                    (Some(n), _) if a.as_str().is_some() || is_sequence(&a) => Some((&a, n)),
                    (_, Some(n)) if b.as_str().is_some() || is_sequence(&b) => Some((&b, n)),
                    _ => None,
                };
                if let Some((value, times)) = repeated {
                    let estimate = measure(caps, value)?.saturating_mul(times);
                    ensure_fits(caps, estimate)?;
                    charge(state, caps, estimate)?;
                }
                Ok(restack(vec![a, b]))
            }
            HookKind::In => {
                let (needle, haystack) = (arg(0), arg(1));
                measure_charge(state, caps, &haystack)?;
                Ok(restack(vec![needle, haystack]))
            }
            HookKind::GetItem => {
                let (container, key) = (arg(0), arg(1));
                if container.as_str().is_some() || container.kind() == ValueKind::Iterable {
                    measure_charge(state, caps, &container)?;
                }
                Ok(restack(vec![container, key]))
            }
            HookKind::Slice => {
                measure_charge(state, caps, &arg(0))?;
                Ok(restack(args.to_vec()))
            }
            HookKind::SetAttr => {
                let (value, target, name) = (arg(0), arg(1), arg(2));
                let ns = target.downcast_object_ref::<Namespace>().ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        format!("can only assign to namespaces, not {}", target.kind()),
                    )
                })?;
                check_namespace_value(state, caps, &value)?;
                ns.set(name.as_str().unwrap_or_default(), value);
                Ok(Value::UNDEFINED)
            }
            HookKind::Filter(name) => run_filter(state, caps, name, args),
            HookKind::Test(name) => {
                if let Some(input) = args.first() {
                    measure_charge(state, caps, input)?;
                }
                Ok(Value::from(state.perform_test(name, args)?))
            }
            HookKind::Namespace => {
                let ns = Namespace::default();
                for map in args {
                    if map.kind() != ValueKind::Map {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "namespace() takes a mapping or keyword arguments",
                        ));
                    }
                    for key in map.try_iter()? {
                        let value = map.get_item(&key)?;
                        check_namespace_value(state, caps, &value)?;
                        ns.set(&py_str(&key), value);
                    }
                }
                Ok(Value::from_object(ns))
            }
            HookKind::RaiseException => {
                let message = py_str(&arg(0)).into_owned();
                Err(Error::new(ErrorKind::InvalidOperation, message.clone())
                    .with_source(Raised(message)))
            }
            HookKind::StrftimeNow => {
                let format = py_str(&arg(0)).into_owned();
                ensure_fits(caps, format.len().saturating_mul(32))?;
                Ok(Value::from(strftime_epoch(&format)))
            }
        }
    }
}

/// The sandboxed environment: built-in filters, tests and functions, transformers' additions, the checks.
fn sandbox_env(limits: TemplateLimits) -> Environment<'static> {
    let caps = Caps::new(limits);
    let mut env = Environment::new();
    // minijinja keeps the fuel in an `isize` (32 bits on wasm32).
    env.set_fuel(Some(limits.fuel.min(isize::MAX as u64)));
    env.set_recursion_limit(RECURSION_LIMIT);
    // `debug()` prints the render's whole state; transformers has no such function.
    env.remove_global("debug");
    env.set_formatter(move |out: &mut Output, state: &State, value: &Value| {
        let text = py_str(value);
        charge(state, caps, text.len())?;
        out.write_str(&text)
            .map_err(|_| Error::new(ErrorKind::WriteFailure, "could not write the output"))
    });
    env.set_unknown_method_callback(move |state, value, method, args| {
        measure_charge(state, caps, value)?;
        if let Some(s) = value.as_str() {
            match method {
                "replace" => {
                    ensure_fits(
                        caps,
                        replace_estimate(s, &str_arg(args, 0), &str_arg(args, 1)),
                    )?;
                }
                "join" => {
                    let items = positional(args, 0).cloned().unwrap_or(Value::UNDEFINED);
                    ensure_fits(caps, join_estimate(caps, &items, s)?)?;
                }
                "format" => ensure_fits(caps, format_estimate(caps, s, args)?)?,
                _ => {}
            }
        }
        minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
    });
    let cap = caps.value;
    env.add_filter("tojson", move |value: &Value, args: Rest<Value>| {
        tojson(value, &args, cap)
    });
    let hook = |kind| Value::from_object(Hook { kind, caps });
    for (name, kind) in [
        (HOOK_CHECK, HookKind::Check),
        (HOOK_CONCAT, HookKind::Concat),
        (HOOK_ADD, HookKind::Add),
        (HOOK_MUL, HookKind::Mul),
        (HOOK_IN, HookKind::In),
        (HOOK_GET_ITEM, HookKind::GetItem),
        (HOOK_SLICE, HookKind::Slice),
        (HOOK_SET_ATTR, HookKind::SetAttr),
        ("namespace", HookKind::Namespace),
        ("raise_exception", HookKind::RaiseException),
        ("strftime_now", HookKind::StrftimeNow),
    ] {
        env.add_global(name, hook(kind));
    }
    for (name, hook_name) in FILTERS {
        env.add_global(*hook_name, hook(HookKind::Filter(name)));
    }
    for (name, hook_name) in TESTS {
        env.add_global(*hook_name, hook(HookKind::Test(name)));
    }
    env
}

/// `strftime_now(format)` at the Unix epoch, 1970-01-01 00:00:00 UTC (a Thursday), with glibc's
/// conversions and its `-` flag (no padding). Unknown conversions are kept as written.
fn strftime_epoch(format: &str) -> String {
    let mut out = String::with_capacity(format.len() * 2);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.next_if_eq(&'-').is_some();
        let Some(conv) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let (padded, bare) = match conv {
            'Y' | 'G' => ("1970", "1970"),
            'C' => ("19", "19"),
            'y' | 'g' => ("70", "70"),
            'm' | 'd' => ("01", "1"),
            'e' => (" 1", "1"),
            'j' => ("001", "1"),
            'H' | 'M' | 'S' | 'U' | 'W' => ("00", "0"),
            'I' => ("12", "12"),
            'V' => ("01", "1"),
            'p' => ("AM", "AM"),
            'P' => ("am", "am"),
            'a' => ("Thu", "Thu"),
            'A' => ("Thursday", "Thursday"),
            'b' | 'h' => ("Jan", "Jan"),
            'B' => ("January", "January"),
            'u' | 'w' => ("4", "4"),
            'Z' => ("UTC", "UTC"),
            'z' => ("+0000", "+0000"),
            's' => ("0", "0"),
            'F' => ("1970-01-01", "1970-01-01"),
            'D' | 'x' => ("01/01/70", "01/01/70"),
            'T' | 'X' => ("00:00:00", "00:00:00"),
            'R' => ("00:00", "00:00"),
            'r' => ("12:00:00 AM", "12:00:00 AM"),
            'c' => ("Thu Jan  1 00:00:00 1970", "Thu Jan  1 00:00:00 1970"),
            'n' => ("\n", "\n"),
            't' => ("\t", "\t"),
            '%' => ("%", "%"),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
                continue;
            }
        };
        out.push_str(if unpadded { bare } else { padded });
    }
    out
}

/// Options of transformers' `tojson` (Python's `json.dumps`).
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
    cap: usize,
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, args: &[Value], cap: usize) -> Result<Value, Error> {
    let (positional, kwargs): (&[Value], minijinja::value::Kwargs) = from_args(args)?;
    let pick = |idx: usize, name: &str| -> Result<Option<Value>, Error> {
        match positional.get(idx) {
            Some(v) => Ok(Some(v.clone())),
            None => kwargs.get::<Option<Value>>(name),
        }
    };
    if positional.len() > 4 {
        return Err(Error::from(ErrorKind::TooManyArguments));
    }
    let ensure_ascii = pick(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(1, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "indent must be an integer or a string",
                    )
                })?;
                let n = usize::try_from(n.max(0)).unwrap_or(usize::MAX);
                if n > cap {
                    return Err(limit(format!("tojson indent {n} is too large")));
                }
                " ".repeat(n)
            }
        }),
    };
    let (item_separator, key_separator) = match pick(2, "separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] => (py_str(item).into_owned(), py_str(key).into_owned()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "separators must be a pair of strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = pick(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
        cap,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

fn push_capped(out: &mut String, text: &str, cap: usize) -> Result<(), Error> {
    if out.len().saturating_add(text.len()) > cap {
        return Err(limit(format!("tojson output would exceed {cap} bytes")));
    }
    out.push_str(text);
    Ok(())
}

fn json_newline(out: &mut String, style: &JsonStyle, level: usize) -> Result<(), Error> {
    if let Some(indent) = &style.indent {
        push_capped(out, "\n", style.cap)?;
        if out.len().saturating_add(indent.len().saturating_mul(level)) > style.cap {
            return Err(limit(format!(
                "tojson output would exceed {} bytes",
                style.cap
            )));
        }
        for _ in 0..level {
            out.push_str(indent);
        }
    }
    Ok(())
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    level: usize,
) -> Result<(), Error> {
    if level > MAX_DEPTH * 2 {
        return Err(limit("tojson: the value is nested too deeply"));
    }
    if let Some(s) = value.as_str() {
        return write_json_string(out, s, style);
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => push_capped(out, "null", style.cap),
        ValueKind::Bool => push_capped(
            out,
            if value.is_true() { "true" } else { "false" },
            style.cap,
        ),
        ValueKind::Number => {
            let text = json_number(value);
            push_capped(out, &text, style.cap)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                return push_capped(out, "[]", style.cap);
            }
            push_capped(out, "[", style.cap)?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    push_capped(out, &style.item_separator, style.cap)?;
                }
                json_newline(out, style, level + 1)?;
                write_json(out, item, style, level + 1)?;
            }
            json_newline(out, style, level)?;
            push_capped(out, "]", style.cap)
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                return push_capped(out, "{}", style.cap);
            }
            push_capped(out, "{", style.cap)?;
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    push_capped(out, &style.item_separator, style.cap)?;
                }
                json_newline(out, style, level + 1)?;
                write_json_string(out, key, style)?;
                push_capped(out, &style.key_separator, style.cap)?;
                write_json(out, item, style, level + 1)?;
            }
            json_newline(out, style, level)?;
            push_capped(out, "}", style.cap)
        }
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("Object of type {kind} is not JSON serializable"),
        )),
    }
}

/// A map key as `json.dumps` writes it: strings as they are, numbers, booleans and None as JSON text.
fn json_key(key: &Value) -> Result<String, Error> {
    if let Some(s) = key.as_str() {
        return Ok(s.to_owned());
    }
    match key.kind() {
        ValueKind::None => Ok("null".to_owned()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::Number => Ok(json_number(key)),
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

/// A number as Python writes it: integers in full, floats as `repr` (`1.0`, `1e-05`, `1e+16`, `NaN`).
fn json_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => py_float(f),
        Err(_) => value.to_string(),
    }
}

fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as Python's repr does.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let point = exp as usize + 1;
            let (int, frac) = if digits.len() > point {
                (digits[..point].to_owned(), digits[point..].to_owned())
            } else {
                (format!("{digits:0<point$}"), "0".to_owned())
            };
            format!("{sign}{int}.{frac}")
        } else {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let rest = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{rest}e{exp_sign}{:02}", exp.unsigned_abs())
    }
}

fn write_json_string(out: &mut String, s: &str, style: &JsonStyle) -> Result<(), Error> {
    if out.len().saturating_add(s.len()) > style.cap {
        return Err(limit(format!(
            "tojson output would exceed {} bytes",
            style.cap
        )));
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (style.ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
        if out.len() > style.cap {
            return Err(limit(format!(
                "tojson output would exceed {} bytes",
                style.cap
            )));
        }
    }
    push_capped(out, "\"", style.cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tokenizer.chat_template` of SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct/*.gguf), verbatim.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    const SMOLLM2_SYSTEM: &str =
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn chat_base() -> Vec<Message> {
        vec![
            msg("system", SMOLLM2_SYSTEM),
            msg("user", "What is the capital of France?"),
        ]
    }

    const CHAT_BASE_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

    fn render(source: &str, messages: &[Message]) -> Result<String, TemplateError> {
        ChatTemplate::new(source, "<s>", "</s>", TemplateLimits::default())?.render(messages, true)
    }

    fn render_limits(source: &str, limits: TemplateLimits) -> Result<String, TemplateError> {
        ChatTemplate::new(source, "<s>", "</s>", limits)?.render(&chat_base(), true)
    }

    fn is_limit(r: &Result<String, TemplateError>) -> bool {
        matches!(r, Err(TemplateError::Limit(_)))
    }

    #[test]
    fn smollm2_template_matches_the_reference_prompt() {
        let t = ChatTemplate::new(
            SMOLLM2,
            "<|im_start|>",
            "<|im_end|>",
            TemplateLimits::default(),
        )
        .unwrap();
        assert_eq!(t.render(&chat_base(), true).unwrap(), CHAT_BASE_PROMPT);
        // Without a system message the template supplies its own.
        let user_only = t
            .render(&[msg("user", "What is the capital of France?")], true)
            .unwrap();
        assert_eq!(user_only, CHAT_BASE_PROMPT);
        // Without the generation prompt.
        let closed = t.render(&chat_base(), false).unwrap();
        assert_eq!(
            closed,
            CHAT_BASE_PROMPT.trim_end_matches("<|im_start|>assistant\n")
        );
    }

    #[test]
    fn builtin_chatml_matches_smollm2() {
        let t = ChatTemplate::builtin(Builtin::ChatMl, "", "<|im_end|>");
        assert_eq!(t.render(&chat_base(), true).unwrap(), CHAT_BASE_PROMPT);
        let convo = [
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("tool", "42"),
        ];
        assert_eq!(
            t.render(&convo, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n"
        );
        assert_eq!(t.render(&[], true).unwrap(), "<|im_start|>assistant\n");
    }

    #[test]
    fn builtin_llama3() {
        let t = ChatTemplate::builtin(Builtin::Llama3, "<|begin_of_text|>", "<|eot_id|>");
        assert_eq!(
            t.render(&chat_base(), true).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let convo = [msg("user", "  Hi \n"), msg("assistant", "Hello!")];
        assert_eq!(
            t.render(&convo, false).unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        );
    }

    #[test]
    fn builtin_gemma() {
        let t = ChatTemplate::builtin(Builtin::Gemma, "<bos>", "<eos>");
        assert_eq!(
            t.render(&chat_base(), true).unwrap(),
            "<bos><start_of_turn>user\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
        );
        let convo = [
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("user", "Bye"),
        ];
        assert_eq!(
            t.render(&convo, true).unwrap(),
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn builtin_llama2() {
        let t = ChatTemplate::builtin(Builtin::Llama2, "<s>", "</s>");
        let convo = [
            msg("system", "Be brief."),
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("user", "Bye"),
        ];
        assert_eq!(
            t.render(&convo, true).unwrap(),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"
        );
        assert_eq!(
            t.render(&[msg("user", "Hi")], true).unwrap(),
            "<s>[INST] Hi [/INST]"
        );
    }

    #[test]
    fn builtin_for_arch() {
        assert_eq!(Builtin::for_arch("llama"), None);
        assert_eq!(Builtin::for_arch("qwen2"), Some(Builtin::ChatMl));
        for arch in ["gemma", "gemma2", "gemma3"] {
            assert_eq!(Builtin::for_arch(arch), Some(Builtin::Gemma));
        }
        assert_eq!(Builtin::for_arch("bert"), None);
    }

    #[test]
    fn every_listed_filter_and_test_exists() {
        let env = sandbox_env(TemplateLimits::default());
        let state = env.empty_state();
        let args = [Value::from("x"), Value::from("y")];
        let upper = [Value::from(vec!["x"]), Value::from("upper")];
        for (name, _) in FILTERS {
            let r = state.apply_filter(name, if *name == "map" { &upper } else { &args });
            assert!(
                !matches!(r, Err(e) if e.kind() == ErrorKind::UnknownFilter),
                "filter {name}"
            );
        }
        for (name, _) in TESTS {
            let r = state.perform_test(name, &args);
            assert!(
                !matches!(r, Err(e) if e.kind() == ErrorKind::UnknownTest),
                "test {name}"
            );
        }
    }

    #[test]
    fn whitespace_follows_transformers() {
        // trim_blocks: the newline after a block tag goes; lstrip_blocks: indentation before one goes;
        // keep_trailing_newline off: the template's last newline goes.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(
            render(src, &chat_base()).unwrap(),
            "[What is the capital of France?]\n"
        );
    }

    #[test]
    fn hf_compatibility_helpers() {
        let m = chat_base();
        assert_eq!(
            render("{{ strftime_now('%d %b %Y') }}", &m).unwrap(),
            "01 Jan 1970"
        );
        assert_eq!(
            render("{{ strftime_now('%Y-%m-%d %H:%M %A %-d %B %j %%') }}", &m).unwrap(),
            "1970-01-01 00:00 Thursday 1 January 001 %"
        );
        assert_eq!(
            render("{{ '  hi  '.strip() }}|{{ 'abc'.startswith('ab') }}|{{ 'a b'.split() | join(',') }}|{{ 'x'.upper() }}", &m).unwrap(),
            "hi|True|a,b|X"
        );
        assert_eq!(
            render(
                "{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}",
                &m
            )
            .unwrap(),
            "a=1;b=2;"
        );
        assert_eq!(
            render(
                "{{ none }} {{ true }} {{ false }} {{ 'x' ~ none ~ true }} {{ undefined_thing }}|",
                &m
            )
            .unwrap(),
            "None True False xNoneTrue |"
        );
        assert_eq!(
            render(
                "{% for i in range(10) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}",
                &m
            )
            .unwrap(),
            "012"
        );
        assert_eq!(
            render("{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.found = true %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.found }} {{ ns.n }}", &m).unwrap(),
            "True 2"
        );
        assert_eq!(
            render("{{ bos_token }}{{ eos_token }}{{ tools is none }}{{ documents is none }}{{ x is defined }}", &m).unwrap(),
            "<s></s>TrueTrueFalse"
        );
        assert_eq!(
            render(
                "{% generation %}a{% endgeneration %}{%- generation -%} b {%- endgeneration -%}",
                &m
            )
            .unwrap(),
            "ab"
        );
        assert_eq!(
            render("{% macro f(x) %}<{{ x }}>{% endmacro %}{{ f(messages[1].content[:4]) }}{{ messages | map(attribute='role') | join('/') }}{{ messages | selectattr('role', 'equalto', 'user') | list | length }}{{ ['a', 'b'] | map('upper') | join }}", &m).unwrap(),
            "<What>system/user1AB"
        );
    }

    #[test]
    fn tojson_like_python() {
        let m = chat_base();
        assert_eq!(
            render("{{ {'a': [1, 2.5, 'é\\n\"'], 'b': none, 'c': true, 'd': 1e-05, 'e': 3.0} | tojson }}", &m).unwrap(),
            "{\"a\": [1, 2.5, \"é\\n\\\"\"], \"b\": null, \"c\": true, \"d\": 1e-05, \"e\": 3.0}"
        );
        assert_eq!(
            render(
                "{{ {'b': [1, {}], 'a': []} | tojson(indent=2, sort_keys=true) }}",
                &m
            )
            .unwrap(),
            "{\n  \"a\": [],\n  \"b\": [\n    1,\n    {}\n  ]\n}"
        );
        assert_eq!(
            render("{{ 'é<>&' | tojson(ensure_ascii=true) }}", &m).unwrap(),
            "\"\\u00e9<>&\""
        );
        assert_eq!(
            render("{{ '😀' | tojson(true) }}", &m).unwrap(),
            "\"\\ud83d\\ude00\""
        );
        assert_eq!(
            render(
                "{{ messages[0] | tojson(separators=(',', ':')) }}",
                &[msg("user", "x")]
            )
            .unwrap(),
            "{\"role\":\"user\",\"content\":\"x\"}"
        );
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(123456.5), "123456.5");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(-2.5e-7), "-2.5e-07");
        assert_eq!(py_float(1e15), "1000000000000000.0");
    }

    #[test]
    fn raise_exception_is_a_render_error_with_the_message() {
        let r = render("{{ raise_exception('no') }}", &chat_base());
        assert_eq!(r, Err(TemplateError::Render("no".into())));
        let r = render(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}",
            &chat_base(),
        );
        assert_eq!(
            r,
            Err(TemplateError::Render(
                "Conversation roles must alternate user/assistant".into()
            ))
        );
    }

    #[test]
    fn syntax_errors() {
        for src in [
            "{% for %}",
            "{{ x | nosuchfilter }}",
            "{% if x is nosuchtest %}{% endif %}",
            "{% if %}",
            "{{ 'unterminated }}",
        ] {
            let r = ChatTemplate::new(src, "", "", TemplateLimits::default());
            assert!(matches!(r, Err(TemplateError::Syntax(_))), "{src}: {r:?}");
        }
    }

    #[test]
    fn no_loader_no_files() {
        for src in [
            "{% include 'x' %}",
            "{% include '/etc/passwd' %}",
            "{% import 'x' as y %}",
            "{% from 'x' import y %}",
            "{% extends 'x' %}",
        ] {
            let r = ChatTemplate::new(src, "", "", TemplateLimits::default());
            assert!(matches!(r, Err(TemplateError::Syntax(_))), "{src}: {r:?}");
        }
        // No environment or globals beyond the documented ones.
        let r = render("{{ env }}{{ os }}{{ config }}{{ self }}|", &chat_base()).unwrap();
        assert_eq!(r, "|");
        assert!(render("{{ debug() }}", &chat_base()).is_err());
    }

    #[test]
    fn source_size_limit() {
        let limits = TemplateLimits {
            max_source_bytes: 100,
            ..TemplateLimits::default()
        };
        let r = ChatTemplate::new(&"x".repeat(101), "", "", limits);
        assert!(matches!(r, Err(TemplateError::Limit(_))), "{r:?}");
        assert!(ChatTemplate::new(&"x".repeat(100), "", "", limits).is_ok());
    }

    #[test]
    fn fuel_ends_loops() {
        let r = render(
            "{% for i in range(50000) %}{% for j in range(50000) %}{% endfor %}{% endfor %}",
            &chat_base(),
        );
        assert!(
            matches!(&r, Err(TemplateError::Limit(m)) if m.contains("fuel")),
            "{r:?}"
        );
        let r = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            &chat_base(),
        );
        assert!(is_limit(&r), "{r:?}");
        let r = render("{% for i in range(10**9) %}x{% endfor %}", &chat_base());
        assert!(is_limit(&r), "{r:?}");
        let r = render(
            "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
            &chat_base(),
        );
        assert!(is_limit(&r), "{r:?}");
    }

    #[test]
    fn string_bombs_stop_early() {
        for src in [
            "{{ 'x' * 100000000 }}",
            "{{ ('x' * 1000) * 1000000 }}",
            "{{ 1000000000 * 'xy' }}",
            "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
            "{% macro f(s, n) %}{% if n > 0 %}{{ f(s ~ s, n - 1) }}{% else %}{{ s | length }}{% endif %}{% endmacro %}{{ f('ab', 40) }}",
            "{% set s = 'x' * 1000 %}{{ s | replace('x', s) | replace('x', s) | length }}",
            "{% set s = 'x' * 1000 %}{{ s.replace('x', s).replace('x', s) | length }}",
            "{% set s = 'x' * 2000 %}{{ s | replace('', s) | length }}",
            "{{ ('a\\n' * 1000) | indent(100000) | length }}",
            "{{ '%1000000000s' | format('x') | length }}",
            "{{ '%.999999999f' | format(1.5) | length }}",
            "{{ '{:>1000000000}'.format('x') | length }}",
            "{{ '{:>{}}'.format('x', 1000000000) | length }}",
            "{{ '%*d' | format(1000000000, 1) | length }}",
            "{% set ns = namespace(s='\"') %}{% for i in range(40) %}{% set ns.s = ns.s | tojson %}{% endfor %}{{ ns.s | length }}",
            "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = [ns.s, ns.s] | join %}{% endfor %}{{ ns.s | length }}",
            "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = (ns.s, ns.s) | string %}{% endfor %}{{ ns.s | length }}",
            "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = '%s%s' | format(ns.s, ns.s) %}{% endfor %}{{ ns.s | length }}",
            "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ''.join([ns.s, ns.s]) %}{% endfor %}{{ ns.s | length }}",
            "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s * 2 %}{% endfor %}{{ ns.s | length }}",
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set x %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = x %}{% endfor %}{{ ns.s | length }}",
        ] {
            let start = std::time::Instant::now();
            let r = render(src, &chat_base());
            assert!(is_limit(&r), "{src}: {r:?}");
            assert!(start.elapsed().as_secs() < 10, "{src} took {:?}", start.elapsed());
        }
    }

    #[test]
    fn constant_folding_is_bounded() {
        // minijinja folds constant expressions while compiling: these must fail before any value is built.
        for src in [
            "{{ 'x' * 100000000 }}",
            "{{ ('x' * 100000000) ~ ('x' * 100000000) }}",
            "{{ ('x' * 1000000) ~ ('x' * 1000000) }}",
            "{{ ([1] * 1000000000) ~ '' }}",
            "{% if 2 in [1] * 1000000000 %}{% endif %}",
            "{% if [1] * 1000000000 == [1] * 1000000000 %}{% endif %}",
            "{{ x | default('x' * (10 ** 8)) }}",
            "{% macro f(a='x' * 100000000) %}{% endmacro %}",
        ] {
            let start = std::time::Instant::now();
            let r = ChatTemplate::new(src, "", "", TemplateLimits::default());
            assert!(matches!(r, Err(TemplateError::Limit(_))), "{src}: {r:?}");
            assert!(
                start.elapsed().as_secs() < 10,
                "{src} took {:?}",
                start.elapsed()
            );
        }
        let m = chat_base();
        assert_eq!(
            render(
                "{{ 3 * 1000000 }} {{ 'ab' * 3 }} {{ 2 ** 10 }} {{ [1, 2] * 2 }}",
                &m
            )
            .unwrap(),
            "3000000 ababab 1024 [1, 2, 1, 2]"
        );
    }

    #[test]
    fn loop_scoped_doubling_does_not_grow() {
        // As in Jinja2, a `{% set %}` inside a loop body is local to one iteration: nothing accumulates.
        let src =
            "{% set s = \"a\" %}{% for i in range(30) %}{% set s = s ~ s %}{% endfor %}{{ s }}";
        assert_eq!(render(src, &chat_base()).unwrap(), "a");
    }

    #[test]
    fn list_bombs_stop_early() {
        for src in [
            "{{ ([1] * 1000000000) | list | length }}",
            "{{ ([1] * 1000000000) | join | length }}",
            "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | list | length }}",
            "{% set s = 'x' * 1000 %}{{ ([s] * 2000) | join | length }}",
            "{% set s = 'x' * 100000 %}{{ [s, s, s, s, s, s, s, s, s, s, s, s] | join | length }}",
            "{{ [1] | batch(1000000000000, 0) | list | length }}",
            "{{ [1] | slice(1000000000000) | list | length }}",
            "{{ range(100000) | list | string | length }}",
            "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}",
            "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}",
            "{% set ns = namespace() %}{% set ns.me = [ns] %}{{ ns }}",
            "{% set a = namespace() %}{% set b = namespace(x=a) %}{{ b }}",
            "{% set s = 'x' * 500000 %}{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + [s ~ i] %}{% endfor %}{{ ns.l | length }}",
            "{% set s = 'x' * 500000 %}{% set ns = namespace() %}{% for i in range(100000) %}{% set ns.a = s ~ i %}{% set ns.b = s ~ i %}{% set ns.c = s ~ i %}{% endfor %}",
            "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{% if 'y' in s %}{% endif %}{% endfor %}",
            "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s[i] }}{% endfor %}",
            "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s | length }}{% endfor %}",
            "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{% if s is lower %}{% endif %}{% endfor %}",
        ] {
            let start = std::time::Instant::now();
            let r = render(src, &chat_base());
            assert!(is_limit(&r), "{src}: {r:?}");
            assert!(start.elapsed().as_secs() < 10, "{src} took {:?}", start.elapsed());
        }
    }

    #[test]
    fn output_limit() {
        let r = render(
            "{% for i in range(5000) %}{{ 'x' * 1000 }}{% endfor %}",
            &chat_base(),
        );
        assert!(is_limit(&r), "{r:?}");
        let small = TemplateLimits {
            max_output_bytes: 100,
            ..TemplateLimits::default()
        };
        let r = render_limits("{% for i in range(1000) %}abc{% endfor %}", small);
        assert!(is_limit(&r), "{r:?}");
        assert_eq!(
            render_limits("{% for i in range(30) %}abc{% endfor %}", small)
                .unwrap()
                .len(),
            90
        );
        // Text captured by {% set %} blocks and macros counts too.
        let r = render(
            &format!(
                "{{% set x %}}{{% for i in range(100000) %}}{}{{% endfor %}}{{% endset %}}",
                "y".repeat(2000)
            ),
            &chat_base(),
        );
        assert!(is_limit(&r), "{r:?}");
    }

    /// Runs `f` on a thread with a 1 MiB stack (wasm's default), so an unbounded recursion would crash.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn deep_recursion_is_an_error_not_a_crash() {
        on_small_stack(|| {
            for src in [
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                "{% macro f(n) %}{% for i in [1] %}{% if true %}{{ f(n + 1) }}{% endif %}{% endfor %}{% endmacro %}{{ f(0) }}",
                "{% macro f(n) %}{% call f(n + 1) %}x{% endcall %}{{ caller() }}{% endmacro %}{% call f(0) %}y{% endcall %}",
                "{% for m in messages recursive %}{{ loop([m]) }}{% endfor %}",
            ] {
                let r = render(src, &chat_base());
                assert!(matches!(r, Err(TemplateError::Limit(_))), "{src}: {r:?}");
            }
            // Deep syntax trees are refused before the parser (which recurses on them) sees them.
            let n = 3000;
            for deep in [
                format!("{{{{ {}1{} }}}}", "(".repeat(n), ")".repeat(n)),
                format!("{{{{ {}1{} }}}}", "[".repeat(n), "]".repeat(n)),
                format!("{{{{ {}1 }}}}", "not ".repeat(n)),
                format!("{{{{ {}1 }}}}", "- ".repeat(n)),
                format!("{{{{ 1{} }}}}", " ~ 1".repeat(n)),
                format!("{{{{ 1{} }}}}", " ** 1".repeat(n)),
                format!("{{{{ 1{} }}}}", "|trim".repeat(n)),
                format!("{{{{ x{} }}}}", ".a".repeat(n)),
                format!("{{{{ f{} }}}}", "()".repeat(n)),
                format!("{{{{ 1{} }}}}", " if 1 else 1".repeat(n)),
                "{% if true %}".repeat(n) + &"{% endif %}".repeat(n),
                "{% for x in y %}".repeat(n) + &"{% endfor %}".repeat(n),
            ] {
                let r = ChatTemplate::new(&deep, "", "", TemplateLimits::default());
                assert!(
                    matches!(r, Err(TemplateError::Limit(_))),
                    "{}: {r:?}",
                    &deep[..40]
                );
            }
            // The deepest nesting allowed still compiles and renders.
            let expressions = [
                format!("{}1{}", "(".repeat(31), ")".repeat(31)),
                format!("1{}", " ~ 1".repeat(62)),
                format!("{}1", "not ".repeat(62)),
                format!("1{}", "|string".repeat(62)),
            ];
            for expr in expressions {
                let src =
                    "{% if true %}".repeat(31) + "{{ " + &expr + " }}" + &"{% endif %}".repeat(31);
                assert!(render(&src, &chat_base()).is_ok(), "{src}");
            }
        });
    }

    /// A large, tool-aware template in the style of current instruct models, to size the default fuel.
    const BIG_TEMPLATE: &str = r#"{%- set ns = namespace(system='', last_user=-1, count=0) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}{%- set ns.system = ns.system ~ message['content'] | trim -%}{%- endif -%}
  {%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- if ns.system or tools is defined -%}
<|start_header_id|>system<|end_header_id|>

{{ strftime_now('%d %b %Y') }}
{% if tools is defined and tools -%}
{%- for t in tools %}{{ t | tojson(indent=4) }}
{% endfor -%}
{%- endif -%}
{{ ns.system }}<|eot_id|>
{%- endif -%}
{%- for message in messages | rejectattr('role', 'equalto', 'system') -%}
  {%- set content = message['content'] -%}
  {%- if message.role == 'assistant' and '</think>' in content -%}
    {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
  {%- endif -%}
  {%- if message.role not in ['user', 'assistant', 'tool'] -%}
    {{- raise_exception('unknown role ' ~ message.role) -}}
  {%- endif -%}
  {{- '<|start_header_id|>' ~ message.role ~ '<|end_header_id|>\n\n' ~ content | trim ~ '<|eot_id|>' -}}
  {%- set ns.count = ns.count + 1 -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start_header_id|>assistant<|end_header_id|>

{% endif -%}"#;

    #[test]
    fn default_fuel_and_budget_have_headroom() {
        let mut messages = vec![msg("system", "You are helpful.")];
        for i in 0..50 {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(msg(
                role,
                &format!("message {i} </think> {}", "word ".repeat(40)),
            ));
        }
        for src in [SMOLLM2, BIG_TEMPLATE, CHATML, LLAMA3, GEMMA, LLAMA2] {
            let t = ChatTemplate::new(src, "<s>", "</s>", TemplateLimits::default()).unwrap();
            let (_, usage) = t.render_with_usage(&messages, true).unwrap();
            let limits = TemplateLimits::default();
            assert!(usage.fuel * 10 < limits.fuel, "fuel {usage:?}");
            assert!(usage.work * 100 < Caps::new(limits).work, "work {usage:?}");
        }
        // Near the output limit: ~900 KiB of conversation still renders with every template.
        let big: Vec<Message> = (0..50)
            .map(|i| {
                msg(
                    if i % 2 == 0 { "user" } else { "assistant" },
                    &"word ".repeat(3600),
                )
            })
            .collect();
        for src in [SMOLLM2, BIG_TEMPLATE, CHATML, LLAMA3, GEMMA, LLAMA2] {
            let t = ChatTemplate::new(src, "<s>", "</s>", TemplateLimits::default()).unwrap();
            let (text, usage) = t.render_with_usage(&big, true).unwrap();
            assert!(text.len() > 850_000);
            assert!(
                usage.work * 2 < Caps::new(TemplateLimits::default()).work,
                "work {usage:?}"
            );
        }
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn render_speed() {
        let messages: Vec<Message> = (0..50)
            .map(|i| {
                msg(
                    if i % 2 == 0 { "user" } else { "assistant" },
                    &"word ".repeat(40),
                )
            })
            .collect();
        for src in [SMOLLM2, BIG_TEMPLATE] {
            let t = ChatTemplate::new(src, "<s>", "</s>", TemplateLimits::default()).unwrap();
            let start = std::time::Instant::now();
            for _ in 0..100 {
                t.render(&messages, true).unwrap();
            }
            eprintln!(
                "{} bytes of template: {:?} per render",
                src.len(),
                start.elapsed() / 100
            );
        }
        let start = std::time::Instant::now();
        let r = render(
            "{% for i in range(50000) %}{% for j in range(50000) %}{% endfor %}{% endfor %}",
            &chat_base(),
        );
        eprintln!("fuel exhaustion: {:?} {r:?}", start.elapsed());
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            TemplateError::Limit("x".into()).to_string(),
            "chat template limit exceeded: x"
        );
        let r = render("{{ messages.nope.deeper }}", &chat_base());
        assert!(matches!(r, Err(TemplateError::Render(_))), "{r:?}");
    }
}
