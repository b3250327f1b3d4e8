import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { ThreadCalls } from '../src/thread.js';

// A real thread: it answers `{ id, n }` with n * 2, holding each request
// until it is told to answer them all, last first (`flush`); `exit` ends
// it, `throw` throws out of its handler, and `ping` is answered at once.
const SCRIPT = `
  const { parentPort } = require('node:worker_threads');
  const held = [];
  parentPort.on('message', (m) => {
    if (m.exit !== undefined) process.exit(m.exit);
    if (m.throw) throw new Error(m.throw);
    if (m.ping) return parentPort.postMessage({ pong: true });
    if (m.flush) { for (const h of held.reverse()) parentPort.postMessage({ id: h.id, value: h.n * 2 }); held.length = 0; return; }
    held.push(m);
  });
`;

type Request = { n?: number; exit?: number; throw?: string };
type Message = { id: number; value: number } | { pong: true };

// A referenced worker shows as a MessagePort among the process's live handles.
const ports = () =>
  process.getActiveResourcesInfo().filter((kind) => kind === 'MessagePort').length;

const workers: Worker[] = [];
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.terminate()));
});

function start(refWhileWaiting = false) {
  const worker = new Worker(SCRIPT, { eval: true });
  workers.push(worker);
  const calls = new ThreadCalls<Request, number>(worker, {
    refWhileWaiting,
    failure: (ended) =>
      new Error('error' in ended ? `failed: ${ended.error.message}` : `exited ${ended.exitCode}`),
  });
  const ponged: Array<() => void> = [];
  worker.on('message', (message: Message) => {
    if ('pong' in message) ponged.shift()?.();
    else calls.resolve(message.id, message.value);
  });
  return {
    worker,
    calls,
    flush: () => worker.postMessage({ flush: true }),
    // Messages keep their order: once the pong is here, every answer posted
    // before it has been handled.
    roundTrip: () =>
      new Promise<void>((resolve) => {
        ponged.push(resolve);
        worker.postMessage({ ping: true });
      }),
  };
}

describe('ThreadCalls', () => {
  it('hands each answer to the call it answers, whatever their order', async () => {
    const { calls, flush } = start();
    const answers = Promise.all([1, 2, 3].map((n) => calls.call({ n })));
    flush();
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
    const { worker, calls } = start();
    const exited = new Promise((resolve) => worker.once('exit', resolve));
    const waiting = calls.call({ n: 1 });
    void calls.call({ throw: 'boom' }).catch(() => {});
    await expect(waiting).rejects.toThrow('failed: boom');
    await exited;
    expect(calls.broken?.message).toBe('failed: boom');
    await expect(calls.call({ n: 1 })).rejects.toThrow('failed: boom');
  });

  it("takes the owner's word that the thread is broken, and ignores answers after it", async () => {
    const { calls, flush, roundTrip } = start();
    const waiting = calls.call({ n: 1 });
    const failed = expect(waiting).rejects.toThrow('closed');
    calls.fail(new Error('closed'));
    calls.fail(new Error('later'));
    flush();
    await roundTrip();
    await failed;
    await expect(calls.call({ n: 1 })).rejects.toThrow('closed');
    expect((await calls.whenBroken).message).toBe('closed');
  });

  it('rejects the one call its owner says failed, and answers the rest', async () => {
    const { calls, flush } = start();
    const first = calls.call({ n: 1 });
    const second = calls.call({ n: 2 });
    // Ids count from 1, in the order of the calls.
    calls.reject(1, new Error('not this one'));
    flush();
    await expect(first).rejects.toThrow('not this one');
    expect(await second).toBe(4);
    expect(calls.broken).toBeUndefined();
  });

  it('fails a request that cannot be sent, and nothing waits on it', async () => {
    const { worker, calls, flush } = start(true);
    worker.unref();
    const idle = ports();
    await expect(calls.call({ n: (() => {}) as unknown as number })).rejects.toThrow(/clone/);
    expect(ports(), 'not referenced for a call that never left').toBe(idle);
    const answer = calls.call({ n: 5 });
    flush();
    expect(await answer).toBe(10);
  });

  it('with refWhileWaiting, keeps the process alive only while a call waits', async () => {
    const { worker, calls, flush } = start(true);
    worker.unref();
    const idle = ports();
    const first = calls.call({ n: 1 });
    const second = calls.call({ n: 2 });
    expect(ports()).toBe(idle + 1);
    flush();
    await Promise.all([first, second]);
    expect(ports()).toBe(idle);
    const third = calls.call({ n: 3 });
    expect(ports()).toBe(idle + 1);
    calls.fail(new Error('gone'));
    await expect(third).rejects.toThrow('gone');
    expect(ports()).toBe(idle);
  });
});
