/*
 * secureinfer — C API.
 *
 * Opaque handles with init/free pairs; every parameter struct has a *_default_params() constructor; every function
 * that can fail returns an si_retcode (0 on success, a negative SI_ERR_* code otherwise) and leaves a human-readable
 * message for the calling thread in si_last_error().
 *
 * Typical use:
 *   si_model_params mp = si_model_default_params();
 *   si_model* model; si_model_load("stories260K.bin", &mp, &model);
 *   si_context_params cp = si_context_default_params();
 *   si_context* ctx; si_context_init(model, &cp, &ctx);
 *   ... si_tokenize, si_generate or si_eval ...
 *   si_context_free(ctx); si_model_free(model);
 */
#ifndef SECUREINFER_H
#define SECUREINFER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes. */
/* (Not named si_status: <signal.h> defines that as a macro.) */
typedef enum si_retcode {
    SI_OK = 0,
    SI_ERR_INVALID_ARGUMENT = -1, /* a bad parameter or request */
    SI_ERR_IO = -2,               /* a file cannot be opened, read or written */
    SI_ERR_FORMAT = -3,           /* a file is corrupt, truncated or inconsistent */
    SI_ERR_UNSUPPORTED = -4,      /* well-formed but unsupported (version, tensor type, architecture) */
    SI_ERR_OUT_OF_MEMORY = -5,
    SI_ERR_INTEGRITY = -6,        /* an integrity check failed; the context is unusable */
    SI_ERR_SECURITY = -7,         /* refused by the security policy */
    SI_ERR_INTERNAL = -8,
    SI_ERR_BUFFER_TOO_SMALL = -9  /* the output buffer is too small; the needed size is returned */
} si_retcode;

/* The message of the last failed call on this thread ("" when none). Valid until the next call on this thread. */
const char* si_last_error(void);
/* A constant name for a status code, e.g. "SI_ERR_FORMAT". */
const char* si_status_name(int status);

typedef int32_t si_token;

/* ---- models ---------------------------------------------------------------------------------------------- */

typedef struct si_model si_model;

typedef enum si_weight_format {
    SI_WEIGHTS_F32 = 0,
    SI_WEIGHTS_INT8 = 1,
    /* Quantised GGUF files: the matrices stay in the file's block format (Q4_0, Q8_0, Q4_K, Q6_K; others are
       re-quantised to Q8_0) and are read in place, with int8 activations per block, as llama.cpp computes. */
    SI_WEIGHTS_NATIVE = 2
} si_weight_format;

typedef struct si_model_params {
    /* Vocabulary for llama2.c checkpoints (tokenizer.bin). NULL: GGUF files carry their own; for llama2.c files
       tok<vocab>.bin or tokenizer.bin next to the model is used if present. */
    const char* tokenizer_path;
    /* Optional LoRA adapter (llama.cpp GGUF adapter format); NULL for none. SI_MODE_PLAIN merges it into the
       weights; the other modes keep it apart and treat it as secret: it is loaded into the enclave only. */
    const char* lora_path;
    float lora_scale; /* multiplies the adapter's alpha / rank scaling; default 1 */
} si_model_params;

/* Defaults: no tokenizer path (found beside the model), no adapter, lora_scale 1. */
si_model_params si_model_default_params(void);
/* Loads a GGUF or llama2.c model, or a protected package (`secureinfer pack`; docs/PACKAGES.md): then only its
   public tensors are loaded here, its secret ones stay encrypted until a context's enclave opens them, and the
   model runs only in SI_MODE_SECUREINFER and SI_MODE_ENCLAVE_ONLY. On success *out owns the model; free it with
   si_model_free. */
int si_model_load(const char* path, const si_model_params* params, si_model** out);
/* Frees a model (NULL is a no-op). Free its contexts first. */
void si_model_free(si_model* model);

/* The vocabulary size, the context length the model was trained with, and the BOS / EOS token ids (0, 0, -1, -1
   for a NULL model). */
int si_model_n_vocab(const si_model* model);
int si_model_n_ctx_train(const si_model* model);
si_token si_model_bos(const si_model* model);
si_token si_model_eos(const si_model* model);

/* Tokenizes UTF-8 text (special tokens in the text are not parsed). Writes at most capacity ids to out and the
   count to *n_out; returns SI_ERR_BUFFER_TOO_SMALL with *n_out = the needed count when capacity is too small. */
int si_tokenize(const si_model* model, const char* text, size_t text_len, int add_bos, si_token* out, size_t capacity,
                size_t* n_out);
/* Text of `token` when it follows `prev` (the leading space after BOS is dropped, byte tokens give raw bytes).
   Same buffer protocol as si_tokenize; the text is not NUL-terminated. */
int si_token_to_piece(const si_model* model, si_token prev, si_token token, char* buf, size_t capacity,
                      size_t* n_out);

/* ---- chat templates (docs/CHAT.md) ----
   The model's chat template (GGUF tokenizer.chat_template) rendered by a Jinja-subset engine; a model without a
   template, or with one the engine cannot handle, gets the documented fallback (ChatML when the vocabulary has
   <|im_start|>/<|im_end|>, else "System: / User: / Assistant:" lines) and a warning. */
/* Renders a conversation: messages_json is a JSON array of {"role": ..., "content": ...} objects (content a
   string, or null beside OpenAI-style "tool_calls"); tools_json is NULL or a JSON array of tools. Same buffer
   protocol as si_token_to_piece. A template's raise_exception (e.g. roles that do not alternate) is
   SI_ERR_INVALID_ARGUMENT with the template's message in si_last_error(). */
int si_chat_apply_template(const si_model* model, const char* messages_json, const char* tools_json,
                           int add_generation_prompt, char* buf, size_t capacity, size_t* n_out);
/* Tokenizes a prompt si_chat_apply_template rendered: with a template, special-token text in it ("<|eot_id|>")
   becomes those tokens and BOS is added unless the text starts with it; the plain fallback tokenizes as
   si_tokenize with BOS. Same buffer protocol as si_tokenize. */
int si_chat_tokenize(const si_model* model, const char* text, size_t text_len, si_token* out, size_t capacity,
                     size_t* n_out);
/* "" when the model's template is used as is, else why the fallback is used. Valid while the model lives. */
const char* si_chat_template_warning(const si_model* model);
/* A stop string the chat format needs ("\nUser:" for the plain fallback, whose turns are not marked by tokens),
   else "". */
const char* si_chat_stop_text(const si_model* model);
/* 1 when `token` ends a turn (EOS, tokenizer.ggml.eot_token_id, <|eot_id|>, <|eom_id|>, <|im_end|>,
   <end_of_turn>, <|end|>, <|endoftext|>, ...), else 0. si_generate stops before any of them. */
int si_token_is_end_of_turn(const si_model* model, si_token token);

/* ---- contexts (one conversation: KV cache, position) -------------------------------------------------------- */

typedef struct si_context si_context;

/* Partition presets (DESIGN.md section 6). */
typedef enum si_mode {
    SI_MODE_SECUREINFER = 0,  /* default: public base projections offloaded on masked, checked inputs */
    SI_MODE_GPU_ONLY = 1,     /* everything in plaintext on the host and accelerator (no security; speed reference) */
    SI_MODE_ENCLAVE_ONLY = 2, /* everything inside the trusted core (slow reference) */
    SI_MODE_PLAIN = 3         /* the plaintext f32/int8 engine (quality reference; no enclave, no fixed point) */
} si_mode;

/* Where the trusted core runs in the secure modes. */
typedef enum si_enclave_host {
    SI_HOST_AUTO = 0,      /* the hardened worker process when its executable exists, else in-process (warned) */
    SI_HOST_INPROCESS = 1, /* inside this process: no isolation (tests only) */
    SI_HOST_WORKER = 2     /* the hardened worker process (secureinfer-worker) */
} si_enclave_host;

typedef struct si_context_params {
    int n_threads;                   /* 0: all online CPUs */
    int n_ctx;                       /* 0: the model's training context */
    int n_batch;                     /* prefill batch, default 512 */
    si_weight_format weight_format;  /* SI_MODE_PLAIN only; default SI_WEIGHTS_F32 */
    si_mode mode;                    /* default SI_MODE_SECUREINFER */
    si_enclave_host enclave_host;    /* default SI_HOST_AUTO */
    int insecure;                    /* SI_MODE_GPU_ONLY: run a model with secret tensors anyway (benchmarks only) */
    const char* secret_tensors;      /* comma-separated tensor names to treat as secret ("*": all), added to those
                                        the model file declares (GGUF key secureinfer.secret_tensors); NULL */
    const char* trace_dir;           /* write the boundary trace (DESIGN.md section 7) there; NULL: none */
    int logprobs;                    /* release the top-K log-probabilities of each sampled token; 0: none */
    float logprob_noise;             /* std of the Gaussian noise added to them before release; default 0 */
    /* Protected packages: how the enclave obtains the model key (tried in this order; NULL: not used). */
    const char* sealed_key_path;     /* unseal from this file if it exists; after a key release, seal to it */
    const char* keyserver_url;       /* attestation-gated release by the owner's keyserver, "http://host:port" */
    const char* owner_key_file;      /* development only: the owner key, read by this (untrusted) process */
    const char* accelerator;         /* accelerator backend of the presets: "cpu" (default; NULL means it) or "cuda" */
    int worker_spin_us;              /* SI_HOST_WORKER: busy-wait this long on each doorbell before sleeping, on
                                        both sides (a core each for lower latency per crossing; without pin_cpu
                                        the core also opens each crossing's precomputed factors while the
                                        accelerator computes); default 0 */
    int pin_cpu;                     /* SI_HOST_WORKER, >= 0: the thread calling si_context_init (which must be the
                                        one that then uses the context) and the worker's serving thread both run
                                        on this CPU only, so that a doorbell switches threads on one CPU instead of
                                        waking a sleeping one; -1 (default): no pinning */
    int precompute_inside_mib;       /* si_context_precompute: factors the trusted core keeps in its own memory, up
                                        to this many MiB (at most 1024); the rest are sealed and kept by the host.
                                        Kept factors are faster to use but occupy enclave memory; default 256 */
    int insecure_memory;             /* SI_HOST_WORKER: start even when neither memfd_secret nor mlock is available
                                        (secrets in ordinary memory; the worker's measured configuration says
                                        memory=unlocked); default 0: the worker refuses to start */
} si_context_params;

/* Defaults: all CPUs, the model's context, n_batch 512, SI_MODE_SECUREINFER, SI_HOST_AUTO, f32 weights (plain
   mode), no trace, no log-probabilities; every pointer NULL. */
si_context_params si_context_default_params(void);
/* Creates a context for `model` (params NULL: the defaults): in the secure modes this starts the trusted core
   (a worker process with SI_HOST_WORKER / SI_HOST_AUTO) and uploads the weights. On success *out owns the context;
   free it with si_context_free before the model. A context is used by one thread at a time; several contexts of
   one model may run on different threads. */
int si_context_init(si_model* model, const si_context_params* params, si_context** out);
/* Frees a context and stops its trusted core (NULL is a no-op). */
void si_context_free(si_context* ctx);
/* Clears the KV cache. */
void si_context_reset(si_context* ctx);
/* The number of tokens in the KV cache, and the context length (0 for a NULL context). */
int si_context_pos(const si_context* ctx);
int si_context_n_ctx(const si_context* ctx);

/* Evaluates tokens at the current position. logits_out, when non-NULL, receives n_vocab floats for the last token
   (all_logits = 0) or n_tokens * n_vocab floats (all_logits = 1). Logits are available in SI_MODE_PLAIN and
   SI_MODE_GPU_ONLY only: in the secure modes they never leave the enclave and a non-NULL logits_out fails with
   SI_ERR_SECURITY. */
int si_eval(si_context* ctx, const si_token* tokens, size_t n_tokens, int all_logits, float* logits_out);

/* Evaluates tokens and returns in *nll_sum the summed negative log-likelihood of targets[i] given tokens[0..i]
   (targets[i] < 0: not scored) and in *n_scored (may be NULL) the number of scored targets. An evaluation feature:
   in the secure modes only this scalar leaves the enclave. */
int si_eval_nll(si_context* ctx, const si_token* tokens, size_t n_tokens, const si_token* targets, double* nll_sum,
                size_t* n_scored);

/* Counters of a context in one of the session modes (all but SI_MODE_PLAIN), since it was created. */
typedef struct si_stats {
    uint64_t enclave_calls;          /* ECALLs */
    uint64_t crossings;              /* offload round trips enclave -> accelerator -> enclave (gpu-only: stages) */
    uint64_t accelerator_calls;      /* products run on the accelerator */
    uint64_t bytes_to_enclave, bytes_from_enclave;
    uint64_t bytes_to_accelerator, bytes_from_accelerator;
    double seconds_enclave, seconds_accelerator, seconds_host;
    double flops_enclave, flops_accelerator, flops_host; /* nominal: 2 per multiply-add */
    /* loading the model (uploads into the enclave and to the accelerator), not included above */
    uint64_t load_bytes_to_enclave, load_bytes_to_accelerator;
    double load_seconds;
} si_stats;
/* Fills *out with the context's counters; SI_ERR_INVALID_ARGUMENT in SI_MODE_PLAIN. */
int si_context_stats(const si_context* ctx, si_stats* out);
/* SI_MODE_SECUREINFER only: precomputes the unblinding factors of the next n_tokens decode steps offline (kept inside
   the enclave up to precompute_inside_mib, sealed outside beyond; each consumed once); later steps fall back to
   online unblinding. progress (may be
   NULL) is called after every batch with (done, total, user_data). *seconds_out (may be NULL) receives the time
   this took; it is not included in si_context_stats. */
typedef void (*si_progress_callback)(int done, int total, void* user_data);
int si_context_precompute(si_context* ctx, int n_tokens, si_progress_callback progress, void* user_data,
                          double* seconds_out);
/* Decode steps for which precomputed unblinding factors remain (0 outside SI_MODE_SECUREINFER or for NULL). */
int si_context_precomputed(const si_context* ctx);
/* The isolation the context's trusted core has, e.g. "worker process (memfd_secret, seccomp, non-dumpable)", and
   warnings about weakened protection, one per line ("" when none). Valid for the context's lifetime. */
const char* si_context_isolation(const si_context* ctx);
const char* si_context_warnings(const si_context* ctx);
/* The log-probabilities released with the most recently sampled token (si_context_params.logprobs): up to capacity
   (token, log-probability) pairs, best first; *n_out receives the count. */
int si_last_logprobs(const si_context* ctx, si_token* tokens, float* logprobs, size_t capacity, size_t* n_out);

/* ---- protection status (the server's GET /v1/secureinfer/status and web chat) ----------------------------------- */
/* A JSON object saying what protects the context's secrets: {"mode", "enclave_host" ("worker", "inprocess" or
   "none"), "isolation" (si_context_isolation), "measurement" (hex: the identity a keyserver checks, of the worker
   configuration this machine runs or of the in-process core; null without an enclave), "measurement_config",
   "package" (null, or {"model_id" (hex), "name", "release": {"logprobs_top_k", "nll"}, "sampling":
   {"max_temperature", "min_top_k", "min_top_p", "min_logprob_noise"}}: the owner's policy, enforced inside the
   core), "secret_tensors" (the model's secret tensors kept inside the core: names, or ["*"]), "adapter" (whether a
   LoRA adapter is kept inside)}. The worker's measurement is found by starting the worker once (--measure).
   Valid until the next call of this function on the calling thread; NULL (si_last_error says why) on failure. */
const char* si_context_protection(const si_context* ctx);

/* ---- load progress ------------------------------------------------------------------------------------------- */
/* Sets the callback si_context_init calls on this thread as it loads a model into the enclave (secure modes):
   progress(done, total, user_data) with done = layers loaded so far out of total = layers + 1 (the last step sets
   up the offloaded products). NULL: none (the default). Per thread. */
void si_set_load_progress(si_progress_callback progress, void* user_data);

/* ---- sampling and generation ------------------------------------------------------------------------------- */

typedef struct si_sampler_params {
    float temperature; /* <= 0: greedy; default 0.8 */
    int top_k;         /* <= 0: off; default 40 */
    float top_p;       /* >= 1: off; default 0.95 */
    uint64_t seed;     /* default 0; pass a random value for non-reproducible output */
} si_sampler_params;

/* Defaults: temperature 0.8, top_k 40, top_p 0.95, seed 0. */
si_sampler_params si_sampler_default_params(void);

/* Called for every generated token with its text; return non-zero to stop generation. */
typedef int (*si_token_callback)(si_token token, const char* piece, size_t piece_len, void* user_data);

/* Evaluates the prompt, then samples up to n_predict tokens, stopping early at EOS (which is not reported) or when
   the callback asks. *n_generated (may be NULL) receives the number of tokens reported. */
int si_generate(si_context* ctx, const si_token* prompt, size_t n_prompt, int n_predict,
                const si_sampler_params* sampler, si_token_callback callback, void* user_data, int* n_generated);

/* ---- sequence slots (continuous batching) ----------------------------------------------------------------- */

/* One context serving up to n_slots sequences with one copy of the weights (in the enclave and on the
   accelerator): each slot has its own KV cache (its memory grows with use), sampler and context. A step advances
   several slots together in one forward pass, one batched product per crossing over all their rows, each row with
   its own fresh masks and checked like any other; each slot gets exactly the tokens it would get alone. The
   single-sequence calls (si_eval, si_generate, si_context_reset, ...) use slot 0. */
/* Like si_context_init (params NULL: the defaults), with n_slots slots (1 .. 1024); SI_MODE_PLAIN is refused. */
int si_slots_context_init(si_model* model, const si_context_params* params, int n_slots, si_context** out);
/* The context's slot count (0 for NULL or SI_MODE_PLAIN) and the tokens in a slot's KV cache (-1: no such slot). */
int si_slots_count(const si_context* ctx);
int si_slots_pos(const si_context* ctx, int slot);
/* Forgets a slot's sequence: its KV cache (freed and zeroed), context and sampler state; nothing of it reaches
   the slot's next sequence. */
int si_slots_reset(si_context* ctx, int slot);
/* The sampler of one slot (sampler NULL: si_sampler_default_params()). */
int si_slots_set_sampler(si_context* ctx, int slot, const si_sampler_params* sampler);
/* One slot's part of a step: tokens appended to its sequence (a decode token or a prompt chunk); sample != 0
   samples the token after them. */
typedef struct si_slot_step {
    int slot;
    const si_token* tokens;
    size_t n_tokens;
    int sample;
} si_slot_step;
/* One batched step over distinct slots (at most n_batch tokens in all): tokens_out[i] receives steps[i]'s sampled
   token, or -1 where it did not sample. */
int si_slots_step(si_context* ctx, const si_slot_step* steps, size_t n_steps, si_token* tokens_out);
/* The most tokens one step may carry (0 for NULL or SI_MODE_PLAIN). */
int si_slots_n_batch(const si_context* ctx);
/* The log-probabilities released with a slot's most recently sampled token (si_context_params.logprobs), as
   si_last_logprobs. */
int si_slots_last_logprobs(const si_context* ctx, int slot, si_token* tokens, float* logprobs, size_t capacity,
                           size_t* n_out);

#ifdef __cplusplus
}
#endif

#endif /* SECUREINFER_H */
