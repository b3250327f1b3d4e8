// `node --import` this to record every package file a process loads, in the
// file PGEMBED_TRACE_MODULES names: ESM through a resolve hook, CommonJS
// (pg, pino, the tokenizer's require) from require.cache as the process exits.
import { appendFileSync } from 'node:fs';
import { createRequire, register } from 'node:module';

const traceFile = process.env.PGEMBED_TRACE_MODULES;
if (traceFile) {
  register(new URL('./module-trace-hooks.mjs', import.meta.url), { data: { traceFile } });
  const require = createRequire(import.meta.url);
  process.on('exit', () => {
    appendFileSync(traceFile, `${Object.keys(require.cache).join('\n')}\n`);
  });
}
