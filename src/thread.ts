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

interface Waiting<Answer> {
  resolve: (answer: Answer) => void;
  reject: (error: Error) => void;
}

/**
 * The calls waiting on a worker thread. Each request goes with an id, and
 * its answer comes back with the same id; the owner's message handler hands
 * it to `resolve` or `reject`. The one owner of those calls: once the thread
 * fails or exits, or the owner says it is broken (`fail`), each waiting call
 * and every later one fails with that first error. PGlite's thread, the
 * counting thread and the local model's each answer this way.
 */
export class ThreadCalls<Request extends object, Answer> {
  readonly #waiting = new Map<number, Waiting<Answer>>();
  #nextId = 0;
  #broken: Error | undefined;
  #onBroken: (error: Error) => void = () => {};
  /** Resolves with the first error once the thread is broken. */
  readonly whenBroken = new Promise<Error>((resolve) => {
    this.#onBroken = resolve;
  });

  /**
   * `failure` names what went wrong, from the thread's error or its exit
   * code. With `refWhileWaiting` the thread keeps the process alive only
   * while a call waits on it; the owner unreferences it to begin with, once
   * it is ready to idle.
   */
  constructor(
    readonly worker: Worker,
    private readonly options: {
      failure: (ended: { error: Error } | { exitCode: number }) => Error;
      refWhileWaiting?: boolean;
    },
  ) {
    worker.on('error', (error) => this.fail(options.failure({ error })));
    worker.on('exit', (exitCode) => this.fail(options.failure({ exitCode })));
  }

  /** Set once the thread has failed or ended: every call fails with it. */
  get broken(): Error | undefined {
    return this.#broken;
  }

  call(request: Request): Promise<Answer> {
    if (this.#broken) return Promise.reject(this.#broken);
    const id = ++this.#nextId;
    return new Promise((resolve, reject) => {
      this.#waiting.set(id, { resolve, reject });
      if (this.options.refWhileWaiting) this.worker.ref();
      try {
        this.worker.postMessage({ ...request, id });
      } catch (error) {
        // Not sent (a value that cannot be cloned): nothing waits on it.
        this.#take(id);
        throw error;
      }
    });
  }

  /** The call `id` is answered; an id no call waits on (failed already) is ignored. */
  resolve(id: number, answer: Answer): void {
    this.#take(id)?.resolve(answer);
  }

  reject(id: number, error: Error): void {
    this.#take(id)?.reject(error);
  }

  /** Fails every call waiting and every later one; the first error stays. */
  fail(error: Error): void {
    if (!this.#broken) {
      this.#broken = error;
      this.#onBroken(error);
    }
    for (const call of this.#waiting.values()) call.reject(this.#broken);
    this.#waiting.clear();
    this.#idle();
  }

  #take(id: number): Waiting<Answer> | undefined {
    const call = this.#waiting.get(id);
    this.#waiting.delete(id);
    this.#idle();
    return call;
  }

  #idle(): void {
    if (this.options.refWhileWaiting && this.#waiting.size === 0) this.worker.unref();
  }
}
