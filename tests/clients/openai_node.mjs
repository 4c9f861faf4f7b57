// openai-node (the official JS SDK) against respserve: create, a streamed create, retrieve and a
// previous_response_id chain. Prints one JSON line of what the SDK parsed; tests/test_clients_node.py
// asserts on it. Usage: node openai_node.mjs BASE_URL MODEL (or RESPSERVE_BASE_URL / RESPSERVE_MODEL).
import OpenAI from 'openai';

const baseURL = process.argv[2] ?? process.env.RESPSERVE_BASE_URL;
const model = process.argv[3] ?? process.env.RESPSERVE_MODEL;
const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 300_000 });

// Short replies: a reply that hits the cap ends `incomplete`, which is as valid a protocol outcome.
const common = { model, temperature: 0, max_output_tokens: 16 };

const created = await client.responses.create({ ...common, input: 'Say hello.' });

const events = [];
const stream = await client.responses.create({ ...common, input: 'Name a colour.', stream: true });
for await (const event of stream) events.push(event);

const retrieved = await client.responses.retrieve(created.id);

const first = await client.responses.create({ ...common, input: 'Remember the word pineapple.' });
const second = await client.responses.create({
  ...common,
  input: 'Which word was it?',
  previous_response_id: first.id,
});

// output_text is the SDK's own convenience field: it shows the SDK understood the output items.
const facts = {
  node: process.version,
  created,
  created_output_text: created.output_text,
  events,
  retrieved,
  chain: [first, second],
};
console.log(JSON.stringify(facts));
