import { Worker, type WorkerOptions } from 'node:worker_threads';

/**
 * Starts the worker-thread module `name` that sits beside the module at
 * `callerUrl`, with that module's extension: `.js` once compiled, `.ts` in
 * the source tree, where tsx compiles it. Node does not hand a loader given
 * with --import on to a worker, so a `.ts` worker registers tsx itself
 * before it imports the file.
 */
export function startSiblingThread(
  callerUrl: string,
  name: string,
  options: WorkerOptions = {},
): Worker {
  const extension = new URL(callerUrl).pathname.match(/\.[cm]?[jt]s$/)?.[0] ?? '.js';
  const file = new URL(`./${name}${extension}`, callerUrl);
  if (!extension.endsWith('ts')) return new Worker(file, options);
  const boot = [
    `import { register } from ${JSON.stringify(import.meta.resolve('tsx/esm/api'))};`,
    'register();',
    `await import(${JSON.stringify(file.href)});`,
  ].join('\n');
  return new Worker(new URL(`data:text/javascript,${encodeURIComponent(boot)}`), options);
}
