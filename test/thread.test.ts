import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { ThreadCalls } from '../src/thread.js';

// A real thread: it answers `{ id, n }` with n * 2, holding each request
// until it is told to answer them all, last first; `{ exit }` ends it, and
// `{ throw }` throws out of its handler.
const SCRIPT = `
  const { parentPort } = require('node:worker_threads');
  const held = [];
  parentPort.on('message', (m) => {
    if (m.exit !== undefined) process.exit(m.exit);
    if (m.throw) throw new Error(m.throw);
    if (m.flush) { for (const h of held.reverse()) parentPort.postMessage({ id: h.id, value: h.n * 2 }); held.length = 0; return; }
    held.push(m);
  });
`;

type Request = { n?: number; exit?: number; throw?: string; flush?: true };

function start(): { worker: Worker; calls: ThreadCalls<Request, number> } {
  const worker = new Worker(SCRIPT, { eval: true });
  const calls = new ThreadCalls<Request, number>(worker, {
    failure: (ended) =>
      new Error('error' in ended ? `failed: ${ended.error.message}` : `exited ${ended.exitCode}`),
  });
  worker.on('message', (answer: { id: number; value: number }) =>
    calls.resolve(answer.id, answer.value),
  );
  workers.push(worker);
  return { worker, calls };
}

const workers: Worker[] = [];
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.terminate()));
});

describe('ThreadCalls', () => {
  it('hands each answer to the call it answers, whatever their order', async () => {
    const { worker, calls } = start();
    const answers = Promise.all([1, 2, 3].map((n) => calls.call({ n })));
    worker.postMessage({ flush: true });
    expect(await answers).toEqual([2, 4, 6]);
    expect(calls.broken).toBeUndefined();
  });

  it("fails the waiting calls and every later one with the thread's exit", async () => {
    const { calls } = start();
    const waiting = calls.call({ n: 1 });
    const ended = calls.call({ exit: 3 });
    await expect(waiting).rejects.toThrow('exited 3');
    await expect(ended).rejects.toThrow('exited 3');
    await expect(calls.call({ n: 2 })).rejects.toThrow('exited 3');
    expect((await calls.whenBroken).message).toBe('exited 3');
  });

  it("fails them with the thread's own error, and keeps that first error after its exit", async () => {
    const { calls } = start();
    const waiting = calls.call({ n: 1 });
    void calls.call({ throw: 'boom' }).catch(() => {});
    await expect(waiting).rejects.toThrow('failed: boom');
    expect(calls.broken?.message).toBe('failed: boom');
  });

  it("takes the owner's word that the thread is broken, and ignores answers after it", async () => {
    const { worker, calls } = start();
    const waiting = calls.call({ n: 1 });
    calls.fail(new Error('closed'));
    calls.fail(new Error('later'));
    worker.postMessage({ flush: true });
    await expect(waiting).rejects.toThrow('closed');
    await expect(calls.call({ n: 1 })).rejects.toThrow('closed');
    expect((await calls.whenBroken).message).toBe('closed');
  });

  it('rejects the one call its owner says failed, and answers the rest', async () => {
    const { worker, calls } = start();
    const first = calls.call({ n: 1 });
    const second = calls.call({ n: 2 });
    calls.reject(1, new Error('not this one'));
    worker.postMessage({ flush: true });
    await expect(first).rejects.toThrow('not this one');
    expect(await second).toBe(4);
    expect(calls.broken).toBeUndefined();
  });
});
