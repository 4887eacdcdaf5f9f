// The npm `openai` client against a running `secureinfer serve` (tests/test_server.cpp runs it with NODE_PATH set to
// where the package was installed). Prints one JSON object with what it got.
//   node openai_client.cjs BASE_URL MODEL PROMPT MAX_TOKENS
const OpenAI = require("openai");

async function main() {
  const [baseURL, model, prompt, maxTokens] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
  const params = { model, prompt, max_tokens: Number(maxTokens), temperature: 0 };
  const out = {};

  const c = await client.completions.create(params);
  out.completion = c.choices[0].text;
  out.finish_reason = c.choices[0].finish_reason;
  out.completion_tokens = c.usage.completion_tokens;

  out.completion_stream = "";
  for await (const chunk of await client.completions.create({ ...params, stream: true }))
    out.completion_stream += chunk.choices[0]?.text ?? "";

  const messages = [{ role: "user", content: "Tell me a story." }];
  const chat = await client.chat.completions.create({ model, messages, max_tokens: 24, temperature: 0 });
  out.chat = chat.choices[0].message.content;
  out.chat_role = chat.choices[0].message.role;
  out.chat_stream = "";
  for await (const chunk of await client.chat.completions.create({ model, messages, max_tokens: 24, temperature: 0,
                                                                   stream: true }))
    out.chat_stream += chunk.choices[0]?.delta?.content ?? "";

  out.models = (await client.models.list()).data.map((m) => m.id);

  try {
    await client.completions.create({ ...params, model: "no-such-model" });
    out.not_found = "no error";
  } catch (e) {
    out.not_found = `${e.constructor.name} ${e.status} ${e.code}`;
  }
  try {
    await client.completions.create({ ...params, max_tokens: "many" });
    out.bad_request = "no error";
  } catch (e) {
    out.bad_request = `${e.constructor.name} ${e.status} ${e.param}`;
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
