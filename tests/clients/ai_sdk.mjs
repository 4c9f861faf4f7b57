// The Vercel AI SDK's OpenAI provider (Responses API) against respserve: generateText, streamText, a forced
// tool call and generateObject. Prints one JSON line of what the SDK parsed; tests/test_clients_node.py
// asserts on it. Usage: node ai_sdk.mjs BASE_URL MODEL (or RESPSERVE_BASE_URL / RESPSERVE_MODEL).
import { createOpenAI } from '@ai-sdk/openai';
import { generateObject, generateText, streamText, tool } from 'ai';
import { z } from 'zod';

const baseURL = process.argv[2] ?? process.env.RESPSERVE_BASE_URL;
const modelName = process.argv[3] ?? process.env.RESPSERVE_MODEL;
const model = createOpenAI({ baseURL, apiKey: 'unused' }).responses(modelName);
const settings = { model, temperature: 0, maxRetries: 0 };

// Plain text: 16 tokens at most, so the reply ends `stop` or `length` (the SDK's name for `incomplete`).
const text = await generateText({ ...settings, prompt: 'Say hello.', maxOutputTokens: 16 });

const errors = [];
const streamed = streamText({
  ...settings,
  prompt: 'Name a colour.',
  maxOutputTokens: 16,
  onError: ({ error }) => errors.push(String(error)),  // streamText reports errors here, never throws
});
const deltas = [];
for await (const delta of streamed.textStream) deltas.push(delta);

// Bounded strings and integers: constrained decoding closes the JSON by itself on any CPU.
const Weather = z.object({ city: z.string().max(24), days: z.number().int().min(1).max(7) });
const forced = await generateText({
  ...settings,
  prompt: 'What is the weather in Paris this week?',
  tools: { get_weather: tool({ description: 'The weather forecast for a city.', inputSchema: Weather }) },
  toolChoice: { type: 'tool', toolName: 'get_weather' },
  maxOutputTokens: 200,
});

const Person = z.object({
  name: z.string().max(20),
  age: z.number().int().min(0).max(120),
  tags: z.array(z.enum(['friend', 'colleague', 'family'])).max(3),
});
const object = await generateObject({
  ...settings,
  schema: Person,
  prompt: 'Describe a person.',
  maxOutputTokens: 200,
});

const facts = {
  node: process.version,
  text: {
    text: text.text,
    finishReason: text.finishReason,
    usage: text.usage,
    responseId: text.response.id,
    providerMetadata: text.providerMetadata,
  },
  stream: {
    text: deltas.join(''),
    deltas: deltas.length,
    finalText: await streamed.text,
    finishReason: await streamed.finishReason,
    usage: await streamed.usage,
    responseId: (await streamed.response).id,
    errors,
  },
  tool: {
    schema: z.toJSONSchema(Weather),
    finishReason: forced.finishReason,
    toolCalls: forced.toolCalls,
    // A call whose input fails the zod schema lands here instead of in toolCalls.
    invalid: forced.content.filter((part) => part.type === 'tool-call' && part.invalid),
    usage: forced.usage,
    responseId: forced.response.id,
  },
  object: {
    schema: z.toJSONSchema(Person),
    object: object.object,
    finishReason: object.finishReason,
    usage: object.usage,
    responseId: object.response.id,
  },
};
console.log(JSON.stringify(facts));
if (errors.length) process.exitCode = 1;
