/**
 * Runs the fake OpenAI server on its own, for manual runs and the benchmark:
 *   npx tsx test/support/serve-fake-openai.ts [--port 8787] [--latency-ms 200]
 * Prints its base URL (for OPENAI_BASE_URL) on stdout; stats on SIGTERM/SIGINT.
 */
import { parseArgs } from 'node:util';
import { startFakeOpenAI } from './fake-openai.js';

const { values } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'latency-ms': { type: 'string', default: '0' },
    'max-input-tokens': { type: 'string', default: '8192' },
  },
});
const fake = await startFakeOpenAI({
  port: Number(values.port),
  latencyMs: Number(values['latency-ms']),
  maxInputTokens: Number(values['max-input-tokens']),
});
process.stdout.write(`${fake.url}\n`);
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, async () => {
    const { requests, inputsEmbedded, tokensEmbedded, rateLimited } = fake.stats;
    process.stderr.write(
      `${JSON.stringify({ requests, inputsEmbedded, tokensEmbedded, rateLimited })}\n`,
    );
    await fake.close();
    process.exit(0);
  });
}
