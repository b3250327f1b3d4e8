import { PassThrough } from 'node:stream';
import pino from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { buildEmbedConfig } from '../../src/config.js';
import { createLogger } from '../../src/log.js';
import type { EmbeddingProvider } from '../../src/provider/client.js';
import { openAIProviderFor } from '../../src/provider/create.js';
import { type ProgressDisplay, terminalProgressBar } from '../../src/report/progress-bar.js';
import { EmbedRun } from '../../src/worker/run.js';
import { deferred } from '../support/deferred.js';
import { makeRun, sampleTexts, seedMessages, useWorkerFixture } from '../support/embed-run.js';

/** A stream that says it is a terminal, recording what is drawn on it. */
function fakeTerminal() {
  const stream = Object.assign(new PassThrough(), {
    isTTY: true,
    columns: 120,
    cursorTo: () => true,
    clearLine: () => true,
    moveCursor: () => true,
  });
  let drawn = '';
  stream.on('data', (chunk: Buffer) => {
    drawn += chunk.toString();
  });
  return { stream: stream as unknown as NodeJS.WriteStream, drawn: () => drawn };
}

/** A terminal that records each write, in order, as it is made. */
function recordingTerminal() {
  const writes: string[] = [];
  const stream = {
    isTTY: true,
    columns: 120,
    write(chunk: unknown, ...rest: unknown[]) {
      writes.push(String(chunk));
      const done = rest.find((r) => typeof r === 'function') as (() => void) | undefined;
      done?.();
      return true;
    },
  };
  return { stream: stream as unknown as NodeJS.WriteStream, writes };
}

// Save cursor and restore cursor (DECSC, DECRC); line wrapping off.
const SAVE_CURSOR = '\x1B7';
const RESTORE_CURSOR = '\x1B8';
const WRAP_OFF = '\x1B[?7l';

describe('the progress display', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('ends its last frame where the cursor is, below whatever was written meanwhile, and never draws again', () => {
    vi.useFakeTimers();
    const terminal = recordingTerminal();
    const bar = terminalProgressBar(terminal.stream);
    bar.start(30);
    bar.update(12, { embedded: 12, skipped: 0, ratePerSecond: 4 });
    vi.advanceTimersByTime(1000);
    // Something else writes a line while the bar is up (a warning, say).
    terminal.stream.write('pgembed: a warning\n');
    const warningAt = terminal.writes.length;
    bar.stop();
    const stopWrites = terminal.writes.slice(warningAt);
    terminal.stream.write('the summary\n');
    vi.advanceTimersByTime(5000);
    bar.update(20, { embedded: 20, skipped: 0, ratePerSecond: 4 });

    // The last frame is drawn on the line after the warning and ends there:
    // no jump back to where the bar started, which would put the lines
    // written next (the summary) on top of the warning and this last frame.
    expect(stopWrites.join('')).toContain('12/30 (40%)');
    expect(stopWrites.at(-1)).toBe('\n');
    expect(terminal.writes).not.toContain(RESTORE_CURSOR);
    expect(terminal.writes).not.toContain(SAVE_CURSOR);
    // The terminal's line wrapping is left alone, so that warning was not cut.
    expect(terminal.writes).not.toContain(WRAP_OFF);
    // Nothing after the summary: no redraw once stopped.
    expect(terminal.writes.at(-1)).toBe('the summary\n');
  });

  it('draws done/total, percent, rate and ETA on a terminal, at most 5 times a second', () => {
    // cli-progress's redraw timer and its clock run in virtual time.
    vi.useFakeTimers();
    const terminal = fakeTerminal();
    const bar = terminalProgressBar(terminal.stream);
    bar.start(30);
    bar.update(12, { embedded: 11, skipped: 1, ratePerSecond: 4.2 });
    // The update waits for the next frame, 200 ms after the first.
    vi.advanceTimersByTime(199);
    expect(terminal.drawn()).not.toContain('12/30');
    vi.advanceTimersByTime(1);
    expect(terminal.drawn()).toContain('12/30 (40%) | 4.2 msg/s | ETA');
    bar.update(30, { embedded: 29, skipped: 1, ratePerSecond: 5 });
    bar.stop();
    expect(terminal.drawn()).toContain('12/30 (40%) | 4.2 msg/s | ETA');
    expect(terminal.drawn()).toContain('30/30 (100%) | 5.0 msg/s | ETA 0s | skipped 1');
  });

  describe('during a run', () => {
    const fx = useWorkerFixture('pglite', { latencyMs: 30 });

    it('is given the planned total and each step up to it, in place of the progress log lines', async () => {
      await seedMessages(fx.database.db, sampleTexts(24));
      const calls: Array<[string, number]> = [];
      const display: ProgressDisplay = {
        start: (total) => calls.push(['start', total]),
        setTotal: (total) => calls.push(['total', total]),
        update: (done) => calls.push(['update', done]),
        stop: () => calls.push(['stop', 0]),
      };
      const lines: string[] = [];
      const logger = createLogger('info', { pretty: false });
      logger.info = ((...args: unknown[]) => {
        lines.push(JSON.stringify(args));
      }) as typeof logger.info;
      const { run } = makeRun(fx.ctx(), { concurrency: '1' }, { progressDisplay: display, logger });
      const outcome = await run.run();
      expect(outcome.summary.embedded).toBe(24);
      // A model's first run: the total grows as the scan beside the run
      // queues the messages, and ends at what was planned.
      expect(calls[0]?.[0]).toBe('start');
      const totals = calls.filter(([kind]) => kind !== 'update' && kind !== 'stop');
      expect(totals.at(-1)?.[1]).toBe(24);
      expect(outcome.summary.planned).toBe(24);
      expect(calls.at(-1)).toEqual(['stop', 0]);
      expect(calls.at(-2)).toEqual(['update', 24]);
      const updates = calls.filter(([kind]) => kind === 'update').map(([, done]) => done);
      expect(updates).toEqual([...updates].sort((a, b) => a - b));
      expect(lines.some((line) => line.includes('"progress"'))).toBe(false);
    });

    it('is taken down at a stop, before anything else is written, and never drawn again', async () => {
      const texts = sampleTexts(24);
      await seedMessages(fx.database.db, texts);
      // One ordered record of every write: the bar's, the log's, the summary's.
      const order: string[] = [];
      const display: ProgressDisplay = {
        start: () => order.push('bar start'),
        setTotal: () => order.push('bar total'),
        update: () => order.push('bar update'),
        stop: () => order.push('bar stop'),
      };
      const logger = pino(
        { level: 'info' },
        {
          write: (line: string) => {
            order.push(`log: ${(JSON.parse(line) as { msg: string }).msg}`);
          },
        },
      );
      const { db, committer, baseUrl } = fx.ctx();
      const config = buildEmbedConfig(
        { 'batch-size': '4', concurrency: '1' },
        { OPENAI_BASE_URL: baseUrl },
      );
      const real = openAIProviderFor(config);
      // The second batch waits to be sent until the run has been stopped.
      const secondBatchWaiting = deferred();
      const stopped = deferred();
      const provider: EmbeddingProvider = {
        get expectedDimensions() {
          return real.expectedDimensions;
        },
        async embed(inputs) {
          if (inputs.includes(texts[4] as string)) {
            secondBatchWaiting.resolve();
            await stopped.promise;
          }
          return real.embed(inputs);
        },
      };
      const run = new EmbedRun({
        db,
        committer,
        provider,
        config,
        logger,
        report: () => order.push('summary'),
        progressDisplay: display,
      });
      const finished = run.run();
      await secondBatchWaiting.promise;
      order.push('signal');
      run.stop('SIGINT');
      stopped.resolve();
      const outcome = await finished;
      expect(outcome.exitCode).toBe(130);

      const signalAt = order.indexOf('signal');
      const stopAt = order.indexOf('bar stop');
      // Down at once, before the run writes anything more (its log lines as
      // it winds down, the summary), and never drawn again.
      expect(stopAt).toBe(signalAt + 1);
      expect(order.filter((o) => o === 'bar stop')).toHaveLength(1);
      expect(order.slice(stopAt + 1).filter((o) => o.startsWith('bar '))).toEqual([]);
      const after = order.slice(stopAt + 1);
      expect(after).toContain('log: run finished');
      expect(after).toContain('summary');
    });
  });
});
