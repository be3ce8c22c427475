//! `engine` suite: a reference inference engine that reuses prefix KV through kvtier.
//!
//! Greedy generation with SmolLM2-135M. For each prompt the engine, like a serving engine with a
//! KV connector would:
//! 1. hashes the prompt into chunk keys (tenant `engine`, layout of the model's f16 cache);
//! 2. LOOKUPs how many leading chunks kvtier holds, GETs them under a lease and imports their KV
//!    in order (steps 2 and 4 go through `kvtier_client::PromptCache`);
//! 3. prefills only the tokens after the hit, then decodes N tokens greedily;
//! 4. PUTs the prompt's full chunks it computed itself (f16, parent = previous chunk's key).
//!
//! Each prompt runs twice: cold (no kvtier, full prefill) and warm (through kvtier, whose cache
//! holds what earlier prompts put). The suite checks that both produce the same tokens (the warm
//! run attends over f16-rounded KV, so it also reports the largest first-token logit
//! difference), and compares time to first token: from the request's start, lookup, get and
//! import included, to the first generated token.
//!
//! The workload is prompts sharing long prefixes, about 90% of each prompt: questions about one
//! document (real prose from /usr/share/common-licenses), and, in the full run, a multi-turn chat
//! whose every turn extends the previous one. Without `--cache ADDR` a kvtier server runs
//! in-process on a Unix socket in a temporary directory.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kvtier::testing::TestServer;
use kvtier_cache::{ChunkKey, Dtype, Namespace};
use kvtier_client::{BlockingClient, BlockingPromptCache, ClientOptions};

use crate::model::forward::Logits;
use crate::model::{KvCache, Model};
use crate::report::{Figures, median};
use crate::suites::capture::{default_texts, tokenize_files};

/// Tenant the engine stores its chunks under.
const TENANT: &str = "engine";
/// Chunk payload dtype: what an f16 serving engine would hand over.
const DTYPE: Dtype = Dtype::F16;

#[derive(clap::Args)]
pub struct Args {
    /// Short run (under a minute on 2 cores): 3 document questions, 4 generated tokens.
    #[arg(long)]
    pub quick: bool,
    /// Address of a running kvtier (`HOST:PORT` or `unix:PATH`); default: start one in-process.
    #[arg(long)]
    pub cache: Option<String>,
    /// Bearer token for `--cache`, if the server wants one.
    #[arg(long)]
    pub token: Option<String>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 64)]
    pub chunk_tokens: u32,
}

/// What one request produced and what it cost.
struct Generation {
    tokens: Vec<u32>,
    /// Logits that chose the first generated token.
    first_logits: Vec<f32>,
    /// Request start to first generated token.
    ttft: Duration,
    /// Lookup + get + import (zero when cold).
    fetch: Duration,
    hit_tokens: usize,
    put_chunks: usize,
    put: Duration,
}

/// A connection to kvtier and, when the suite started the server itself, that server. The
/// engine is synchronous (the model saturates the cores), so it talks to kvtier through the
/// blocking client.
struct Remote {
    client: BlockingClient,
    addr: String,
    server: Option<TestServer>,
}

fn client_options(token: Option<String>) -> ClientOptions {
    ClientOptions {
        token,
        tenant: Some(TENANT.to_string()),
        client_name: "kvtier-bench engine".into(),
    }
}

impl Remote {
    /// Starts a kvtier server in this process (host tier only, loopback, a Unix socket in a
    /// temporary directory) and connects to it over the socket, as a co-located engine would.
    fn start_in_process() -> Result<Remote> {
        let server = TestServer::start(|c| c.host_bytes = 1 << 30)?;
        let addr = server.unix.clone();
        let client = BlockingClient::connect(&addr, client_options(None))
            .with_context(|| format!("connecting to the in-process kvtier at {addr}"))?;
        Ok(Remote {
            client,
            addr,
            server: Some(server),
        })
    }

    fn connect(addr: &str, token: Option<String>) -> Result<Remote> {
        let client = BlockingClient::connect(addr, client_options(token))
            .with_context(|| format!("connecting to kvtier at {addr}"))?;
        Ok(Remote {
            client,
            addr: addr.to_string(),
            server: None,
        })
    }

    /// Stops the in-process server, if any, and reports whether it ran cleanly.
    fn shutdown(self) -> Result<()> {
        let Remote { client, server, .. } = self;
        drop(client);
        if let Some(s) = server {
            s.stop()?;
        }
        Ok(())
    }
}

/// The engine: a model and the key space its prompts are hashed in.
struct Engine<'m> {
    model: &'m Model,
    ns: Namespace,
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

impl<'m> Engine<'m> {
    fn new(model: &'m Model, chunk_tokens: u32) -> Engine<'m> {
        let fp = model.config.layout(DTYPE).fingerprint();
        Engine {
            model,
            ns: Namespace::new(fp, TENANT).with_chunk_tokens(chunk_tokens),
        }
    }

    /// Serves one request: `steps` greedy tokens after `prompt`, reusing and filling kvtier's
    /// cache when `remote` is given, computing everything itself when it is not.
    fn generate(
        &self,
        prompt: &[u32],
        steps: usize,
        remote: Option<&Remote>,
    ) -> Result<Generation> {
        ensure!(
            !prompt.is_empty() && steps > 0,
            "empty prompt or nothing to generate"
        );
        let ct = self.ns.chunk_tokens as usize;
        let t0 = Instant::now();
        let mut cache = self.model.new_cache();
        let prompt_cache = remote.map(|r| r.client.prompt_cache(self.ns.clone()));
        let mut keys = Vec::new();
        if let Some(pc) = &prompt_cache {
            // Lookup checks the server hashed with our tenant; fetch leases the hit chunks, reads
            // them into one buffer and checks their layout and size.
            let hit = pc.lookup(prompt)?;
            keys = hit.keys;
            let mut n = hit.hit_chunks;
            // The first generated token needs the last prompt token's logits, so at least one
            // token is always prefilled: when the whole prompt hits, its last chunk is recomputed.
            if n * ct >= prompt.len() {
                n -= 1;
            }
            // A chunk evicted between lookup and fetch ends the prefix: prefill from there.
            let got = pc.fetch(&keys[..n], Vec::new())?;
            for i in 0..got.len() {
                cache.import_chunk(got.payload(i), i * ct, ct, DTYPE)?;
            }
        }
        let fetch = t0.elapsed();
        let hit_tokens = cache.len();
        let first_logits = self
            .model
            .forward(&prompt[hit_tokens..], &mut cache, Logits::Last)?;
        let mut tokens = vec![argmax(&first_logits)];
        let ttft = t0.elapsed();
        // A fixed number of tokens, EOS or not: cold and warm must be compared over equal lengths.
        while tokens.len() < steps {
            let last = *tokens.last().expect("at least one token");
            let logits = self.model.forward(&[last], &mut cache, Logits::Last)?;
            tokens.push(argmax(&logits));
        }
        let (put_chunks, put) = match &prompt_cache {
            Some(pc) => self.put_new_chunks(pc, &cache, &keys, hit_tokens / ct)?,
            None => (0, Duration::ZERO),
        };
        Ok(Generation {
            tokens,
            first_logits,
            ttft,
            fetch: if remote.is_some() {
                fetch
            } else {
                Duration::ZERO
            },
            hit_tokens,
            put_chunks,
            put,
        })
    }

    /// PUTs the prompt's full chunks from `from` on (those the engine computed, not imported).
    /// Generated tokens are not stored: the next prompt of a chat re-sends them as prompt text.
    fn put_new_chunks(
        &self,
        pc: &BlockingPromptCache,
        cache: &KvCache,
        keys: &[ChunkKey],
        from: usize,
    ) -> Result<(usize, Duration)> {
        let ct = self.ns.chunk_tokens as usize;
        let t = Instant::now();
        for i in from..keys.len() {
            let payload = cache.export_chunk(i * ct..(i + 1) * ct, DTYPE)?;
            pc.put_chunk(keys, i, &payload)?;
        }
        Ok((keys.len().saturating_sub(from), t.elapsed()))
    }
}

/// One prompt's cold and warm runs.
struct Row {
    name: String,
    prompt_tokens: usize,
    /// Longest prefix shared with any earlier prompt.
    shared_tokens: usize,
    cold: Generation,
    warm: Generation,
}

impl Row {
    fn equal(&self) -> bool {
        self.cold.tokens == self.warm.tokens
    }

    fn max_logit_diff(&self) -> f32 {
        self.cold
            .first_logits
            .iter()
            .zip(&self.warm.first_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }
}

/// Runs prompts in order, each cold then warm, so every warm run sees what earlier warm runs
/// stored (and nothing from its own cold run, which never talks to kvtier).
struct Runner<'a> {
    engine: Engine<'a>,
    remote: &'a Remote,
    steps: usize,
    seen: Vec<Vec<u32>>,
    rows: Vec<Row>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Runner<'_> {
    fn run(&mut self, name: String, prompt: Vec<u32>) -> Result<&Row> {
        let cold = self.engine.generate(&prompt, self.steps, None)?;
        let warm = self
            .engine
            .generate(&prompt, self.steps, Some(self.remote))?;
        let shared_tokens = self
            .seen
            .iter()
            .map(|s| common_prefix(s, &prompt))
            .max()
            .unwrap_or(0);
        self.rows.push(Row {
            name,
            prompt_tokens: prompt.len(),
            shared_tokens,
            cold,
            warm,
        });
        self.seen.push(prompt);
        Ok(self.rows.last().expect("just pushed"))
    }
}

/// Workload sizes.
struct Plan {
    /// Tokens of the document prefix (system header + prose), a multiple of the chunk size.
    doc_prefix: usize,
    questions: usize,
    /// Tokens of the chat's opening (system message with prose); 0 skips the chat.
    chat_prefix: usize,
    chat_turns: usize,
    steps: usize,
}

const QUESTIONS: &[&str] = &[
    "What does this license let me do?",
    "Who is called a Contributor here?",
    "Can I use the work commercially?",
    "What must I keep when I redistribute it?",
    "Does it grant any patent rights?",
    "What happens if I sue over a patent?",
    "Is there any warranty?",
    "Can I add my own license terms to changes?",
    "What is a Derivative Work?",
    "Do I need to state that I changed files?",
    "What does the NOTICE file do?",
    "Can I use the licensor's trademarks?",
];

const CHAT: &[&str] = &[
    "Summarise the preamble in one sentence.",
    "What is the aim of this license?",
    "Which freedoms are listed?",
    "Who must receive the source code?",
    "Can I charge a fee for copies?",
    "What about patents?",
    "Is there any warranty?",
    "What does propagate mean?",
    "What is an installation information?",
    "How do I apply these terms to a new program?",
    "Thank you. Anything else to know?",
    "One more: can I combine it with other code?",
];

/// `header` + the first tokens of `texts` so that the whole is exactly `total` tokens.
fn prefix(
    model: &Model,
    header: &str,
    texts: &[std::path::PathBuf],
    total: usize,
) -> Result<Vec<u32>> {
    let mut ids = model.tokenizer.encode_with_special(header)?;
    ensure!(
        ids.len() + 2 <= total,
        "prefix of {total} tokens is too short for its header"
    );
    ids.extend(tokenize_files(model, texts, total - ids.len())?);
    Ok(ids)
}

fn question_prompt(model: &Model, doc: &[u32], q: &str) -> Result<Vec<u32>> {
    let mut p = doc.to_vec();
    p.extend(model.tokenizer.encode_with_special(&format!(
        "\n\nQuestion: {q} Answer in one short sentence and quote the document where it helps.<|im_end|>\n<|im_start|>assistant\n"
    ))?);
    Ok(p)
}

fn user_turn(model: &Model, msg: &str) -> Result<Vec<u32>> {
    model.tokenizer.encode_with_special(&format!(
        "<|im_start|>user\n{msg} Please keep it short and stick to the text above.<|im_end|>\n<|im_start|>assistant\n"
    ))
}

/// Runs the plan's workload: document questions, then the chat.
fn run_workload(
    model: &Model,
    remote: &Remote,
    chunk_tokens: u32,
    plan: &Plan,
) -> Result<Vec<Row>> {
    let texts = default_texts();
    ensure!(
        !texts.is_empty(),
        "the engine workload needs the license texts under /usr/share/common-licenses"
    );
    let mut runner = Runner {
        engine: Engine::new(model, chunk_tokens),
        remote,
        steps: plan.steps,
        seen: Vec::new(),
        rows: Vec::new(),
    };
    let doc = prefix(
        model,
        "<|im_start|>system\nAnswer questions about this document.\n\n",
        &texts,
        plan.doc_prefix,
    )?;
    for (i, q) in QUESTIONS.iter().cycle().take(plan.questions).enumerate() {
        runner.run(format!("doc q{i}"), question_prompt(model, &doc, q)?)?;
    }
    if plan.chat_turns > 0 {
        // A different document, so the chat's first turn is a genuine miss.
        let other: Vec<_> = texts.iter().skip(1).cloned().collect();
        let mut history = prefix(
            model,
            "<|im_start|>system\nYou are a helpful assistant. The user asks about this text.\n\n",
            if other.is_empty() { &texts } else { &other },
            plan.chat_prefix,
        )?;
        history.extend(model.tokenizer.encode_with_special("<|im_end|>\n")?);
        for (t, msg) in CHAT.iter().cycle().take(plan.chat_turns).enumerate() {
            let mut prompt = history;
            prompt.extend(user_turn(model, msg)?);
            let row = runner.run(format!("chat t{t}"), prompt.clone())?;
            // The conversation continues with the reference (cold) answer, so the workload does
            // not depend on whether the warm run matched.
            prompt.extend(&row.cold.tokens);
            prompt.extend(model.tokenizer.encode_with_special("<|im_end|>\n")?);
            history = prompt;
        }
    }
    Ok(runner.rows)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_rows(model: &Model, rows: &[Row]) {
    println!(
        "{:<9} {:>6} {:>7} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>5}  output",
        "prompt",
        "tokens",
        "shared",
        "hit",
        "cold ms",
        "warm ms",
        "speedup",
        "fetch ms",
        "|dlogit|",
        "equal"
    );
    for r in rows {
        println!(
            "{:<9} {:>6} {:>6.1}% {:>5} {:>9.1} {:>9.1} {:>7.2}x {:>8.1} {:>8.4} {:>5}  {:?}",
            r.name,
            r.prompt_tokens,
            100.0 * r.shared_tokens as f64 / r.prompt_tokens as f64,
            r.warm.hit_tokens,
            ms(r.cold.ttft),
            ms(r.warm.ttft),
            r.cold.ttft.as_secs_f64() / r.warm.ttft.as_secs_f64(),
            ms(r.warm.fetch),
            r.max_logit_diff(),
            r.equal(),
            model.tokenizer.decode(&r.warm.tokens),
        );
    }
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.chunk_tokens > 0, "--chunk-tokens must be positive");
    let plan = if a.quick {
        Plan {
            doc_prefix: 256,
            questions: 3,
            chat_prefix: 0,
            chat_turns: 0,
            steps: 4,
        }
    } else {
        Plan {
            doc_prefix: 384,
            questions: 10,
            chat_prefix: 320,
            chat_turns: 10,
            steps: 8,
        }
    };
    let t0 = Instant::now();
    let model = Model::load_default()?;
    println!("model loaded in {:.1} s", t0.elapsed().as_secs_f64());
    let remote = match &a.cache {
        Some(addr) => Remote::connect(addr, a.token.clone())?,
        None => Remote::start_in_process()?,
    };
    let where_ = match remote.server {
        Some(_) => format!("in-process kvtier at {}", remote.addr),
        None => format!("kvtier at {}", remote.addr),
    };
    println!(
        "engine: {where_}, tenant {TENANT:?}, {} tokens per chunk ({} KiB f16), {} generated tokens",
        a.chunk_tokens,
        model
            .new_cache()
            .chunk_bytes(a.chunk_tokens as usize, DTYPE)
            >> 10,
        plan.steps
    );
    let t_run = Instant::now();
    let rows = run_workload(&model, &remote, a.chunk_tokens, &plan)?;
    let run_s = t_run.elapsed().as_secs_f64();
    print_rows(&model, &rows);
    remote.shutdown()?;

    let n = rows.len() as f64;
    let cold: Vec<f64> = rows.iter().map(|r| ms(r.cold.ttft)).collect();
    let warm: Vec<f64> = rows.iter().map(|r| ms(r.warm.ttft)).collect();
    let hit_fraction = rows
        .iter()
        .map(|r| r.warm.hit_tokens as f64 / r.prompt_tokens as f64)
        .sum::<f64>()
        / n;
    let shared_fraction = rows
        .iter()
        .map(|r| r.shared_tokens as f64 / r.prompt_tokens as f64)
        .sum::<f64>()
        / n;
    let lens: Vec<usize> = rows.iter().map(|r| r.prompt_tokens).collect();
    let all_equal = rows.iter().all(Row::equal);
    let (cold_med, warm_med) = (median(&cold), median(&warm));
    println!(
        "TTFT median: cold {cold_med:.1} ms, warm {warm_med:.1} ms ({:.2}x); tokens equal: {all_equal}; {run_s:.1} s",
        cold_med / warm_med
    );

    let mut f = Figures::new("engine");
    f.set("prompts", rows.len());
    f.set(
        "cache",
        if a.cache.is_some() {
            "remote"
        } else {
            "in-process"
        },
    );
    f.set("chunk_tokens", a.chunk_tokens);
    f.set("generated_tokens", plan.steps);
    f.set("prompt_tokens_min", *lens.iter().min().unwrap_or(&0));
    f.set("prompt_tokens_max", *lens.iter().max().unwrap_or(&0));
    f.num("prompt_tokens_mean", lens.iter().sum::<usize>() as f64 / n);
    f.num("shared_prefix_fraction", shared_fraction);
    f.set("tokens_equal", all_equal);
    f.set("prompts_equal", rows.iter().filter(|r| r.equal()).count());
    f.num("ttft_cold_ms", cold_med);
    f.num("ttft_warm_ms", warm_med);
    f.num("ttft_speedup", cold_med / warm_med);
    f.num("hit_tokens_fraction", hit_fraction);
    f.set(
        "warm_misses",
        rows.iter().filter(|r| r.warm.hit_tokens == 0).count(),
    );
    f.num(
        "fetch_ms",
        median(
            &rows
                .iter()
                .filter(|r| r.warm.hit_tokens > 0)
                .map(|r| ms(r.warm.fetch))
                .collect::<Vec<_>>(),
        ),
    );
    f.num(
        "put_ms",
        median(
            &rows
                .iter()
                .filter(|r| r.warm.put_chunks > 0)
                .map(|r| ms(r.warm.put))
                .collect::<Vec<_>>(),
        ),
    );
    f.num(
        "max_first_logit_diff",
        rows.iter().map(Row::max_logit_diff).fold(0.0, f32::max) as f64,
    );
    f.num("run_s", run_s);
    f.print();
    if !all_equal {
        bail!(
            "warm generation differed from cold on {} prompt(s)",
            rows.iter().filter(|r| !r.equal()).count()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::model;

    /// Two questions about one document through an in-process kvtier: the second prompt's warm
    /// run must reuse the chunks the first one stored and still generate exactly what a full
    /// prefill generates.
    #[test]
    fn warm_prompts_reuse_kvtier_chunks_and_match_cold() {
        let m = model();
        let remote = Remote::start_in_process().unwrap();
        let plan = Plan {
            doc_prefix: 128,
            questions: 2,
            chat_prefix: 0,
            chat_turns: 0,
            steps: 2,
        };
        let rows = run_workload(m, &remote, 64, &plan).unwrap();
        assert_eq!(rows.len(), 2);
        // The first prompt found nothing and stored its two document chunks.
        assert_eq!(rows[0].warm.hit_tokens, 0);
        assert_eq!(rows[0].warm.put_chunks, rows[0].prompt_tokens / 64);
        // The second one shares the 128-token document and hits both of its chunks.
        // ("\n\nQuestion: " after it is shared too, but only full chunks are stored.)
        assert!(rows[1].shared_tokens >= 128);
        assert_eq!(
            rows[1].warm.hit_tokens, 128,
            "warm run should import the shared chunks"
        );
        for r in &rows {
            assert_eq!(r.cold.tokens.len(), 2);
            assert_eq!(r.cold.hit_tokens, 0);
            assert_eq!(
                r.cold.tokens,
                r.warm.tokens,
                "{}: warm generation differs from cold (max first-logit diff {})",
                r.name,
                r.max_logit_diff()
            );
            // f16 KV moves logits a little, never a lot.
            assert!(
                r.max_logit_diff() < 0.5,
                "{}: logit diff {}",
                r.name,
                r.max_logit_diff()
            );
        }
        remote.shutdown().unwrap();
    }
}
