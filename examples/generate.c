/*
 * generate: text from a prompt through the public C API (secureinfer.h) in the secureinfer preset: the trusted
 * core runs in the hardened worker process, the public base projections are offloaded on masked inputs and only
 * sampled tokens come back.
 *
 *   example-generate MODEL [TOKENIZER] [PROMPT] [N_PREDICT] [TEMPERATURE] [SEED]
 *
 * TOKENIZER may be "" (GGUF models carry their own). The defaults are greedy decoding of 64 tokens from BOS.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "secureinfer.h"

/* Called with every generated token; the prompt is not echoed. */
static int print_piece(si_token token, const char* piece, size_t len, void* user_data) {
    (void)token;
    (void)user_data;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0; /* non-zero would stop generation */
}

static int fail(const char* what, int rc) {
    fprintf(stderr, "example-generate: %s: %s (%s)\n", what, si_last_error(), si_status_name(rc));
    return 1;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [TOKENIZER] [PROMPT] [N_PREDICT] [TEMPERATURE] [SEED]\n", argv[0]);
        return 2;
    }
    const char* prompt = argc > 3 ? argv[3] : "";
    const int n_predict = argc > 4 ? atoi(argv[4]) : 64;

    si_model_params mp = si_model_default_params();
    mp.tokenizer_path = argc > 2 && argv[2][0] ? argv[2] : NULL;
    si_model* model = NULL;
    int rc = si_model_load(argv[1], &mp, &model);
    if (rc != SI_OK) return fail("loading the model", rc);

    si_context_params cp = si_context_default_params();
    cp.mode = SI_MODE_SECUREINFER;
    si_context* ctx = NULL;
    rc = si_context_init(model, &cp, &ctx);
    if (rc != SI_OK) {
        si_model_free(model);
        return fail("creating the context", rc);
    }
    if (si_context_warnings(ctx)[0]) fprintf(stderr, "example-generate: warning: %s\n", si_context_warnings(ctx));
    fprintf(stderr, "example-generate: trusted core: %s\n", si_context_isolation(ctx));

    /* The first call, without a buffer, says how many tokens the prompt has (BOS included). */
    size_t n_prompt = 0;
    rc = si_tokenize(model, prompt, strlen(prompt), 1, NULL, 0, &n_prompt);
    si_token* tokens = malloc(n_prompt * sizeof *tokens);
    if (tokens && (rc == SI_OK || rc == SI_ERR_BUFFER_TOO_SMALL))
        rc = si_tokenize(model, prompt, strlen(prompt), 1, tokens, n_prompt, &n_prompt);

    si_sampler_params sp = si_sampler_default_params();
    sp.temperature = argc > 5 ? (float)atof(argv[5]) : 0.0f; /* 0: greedy */
    sp.seed = argc > 6 ? strtoull(argv[6], NULL, 10) : 0;
    int n_generated = 0;
    if (tokens && rc == SI_OK) {
        rc = si_generate(ctx, tokens, n_prompt, n_predict, &sp, print_piece, NULL, &n_generated);
        putchar('\n');
    }
    const int ok = tokens && rc == SI_OK;
    if (!ok) fail("generating", tokens ? rc : SI_ERR_OUT_OF_MEMORY);
    else fprintf(stderr, "example-generate: %d tokens\n", n_generated);

    free(tokens);
    si_context_free(ctx);
    si_model_free(model);
    return ok ? 0 : 1;
}
