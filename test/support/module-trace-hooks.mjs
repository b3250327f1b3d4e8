// Resolve hooks for module-trace.mjs: they run on their own thread, so each
// package file resolved is appended to the trace file at once, not posted back.
import { appendFileSync } from 'node:fs';

let traceFile;

export function initialize(data) {
  traceFile = data.traceFile;
}

export async function resolve(specifier, context, next) {
  const result = await next(specifier, context);
  if (result.url.includes('/node_modules/')) appendFileSync(traceFile, `${result.url}\n`);
  return result;
}
