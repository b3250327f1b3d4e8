import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { Waker } from '../../src/worker/waker.js';

describe('the watcher’s waker', () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('ends a wait at a wake-up, before the poll’s timeout', async () => {
    const waker = new Waker();
    let woke = false;
    const waiting = waker.wait(1000, new AbortController().signal).then(() => {
      woke = true;
    });
    await vi.advanceTimersByTimeAsync(999);
    expect(woke).toBe(false);
    waker.notify();
    await waiting;
    expect(woke).toBe(true);
  });

  it('keeps a wake-up that came while busy, so the next wait returns at once, once', async () => {
    const waker = new Waker();
    waker.notify();
    let first = false;
    await waker.wait(1000, new AbortController().signal).then(() => {
      first = true;
    });
    expect(first).toBe(true);
    let second = false;
    const waiting = waker.wait(1000, new AbortController().signal).then(() => {
      second = true;
    });
    await vi.advanceTimersByTimeAsync(999);
    expect(second).toBe(false);
    await vi.advanceTimersByTimeAsync(1);
    await waiting;
    expect(second).toBe(true);
  });

  it('ends a wait on a stop', async () => {
    const waker = new Waker();
    const stop = new AbortController();
    let ended = false;
    const waiting = waker.wait(60_000, stop.signal).then(() => {
      ended = true;
    });
    await vi.advanceTimersByTimeAsync(10);
    expect(ended).toBe(false);
    stop.abort();
    await waiting;
    expect(ended).toBe(true);
  });
});
