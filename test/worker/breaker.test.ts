import { describe, expect, it } from 'vitest';
import { CircuitBreaker } from '../../src/worker/breaker.js';

describe('the circuit breaker', () => {
  it('opens after 3 failed batches in a row, and a success in between starts the count again', () => {
    const breaker = new CircuitBreaker();
    expect([breaker.record(true), breaker.record(true)]).toEqual([false, false]);
    expect(breaker.record(false)).toBe(false);
    expect(breaker.failedInRow).toBe(0);
    expect([breaker.record(true), breaker.record(true), breaker.record(true)]).toEqual([
      false,
      false,
      true,
    ]);
    expect(breaker.state).toBe('open');
  });

  it('half-open lets one trial through: a failure reopens it for twice as long, up to the cap; a success closes it', () => {
    const breaker = new CircuitBreaker(3, 30_000, 100_000);
    for (let i = 0; i < 3; i++) breaker.record(true);
    expect(breaker.pauseMs).toBe(30_000);
    breaker.halfOpen();
    expect(breaker.state).toBe('half-open');
    expect(breaker.record(true)).toBe(true);
    expect([breaker.state, breaker.pauseMs]).toEqual(['open', 60_000]);
    breaker.halfOpen();
    breaker.record(true);
    expect(breaker.pauseMs).toBe(100_000);
    breaker.halfOpen();
    expect(breaker.record(false)).toBe(false);
    expect([breaker.state, breaker.pauseMs, breaker.failedInRow]).toEqual(['closed', 30_000, 0]);
  });
});
