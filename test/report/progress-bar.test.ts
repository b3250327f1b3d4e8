import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../../src/log.js';
import { type ProgressDisplay, terminalProgressBar } from '../../src/report/progress-bar.js';
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

describe('the progress display', () => {
  it('draws done/total, percent, rate and ETA on a terminal', async () => {
    const terminal = fakeTerminal();
    const bar = terminalProgressBar(terminal.stream);
    bar.start(30);
    bar.update(12, { embedded: 11, skipped: 1, ratePerSecond: 4.2 });
    // It redraws at most 5 times a second.
    await new Promise((r) => setTimeout(r, 250));
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
      expect(calls[0]).toEqual(['start', 24]);
      expect(calls.at(-1)).toEqual(['stop', 0]);
      expect(calls.at(-2)).toEqual(['update', 24]);
      const updates = calls.filter(([kind]) => kind === 'update').map(([, done]) => done);
      expect(updates).toEqual([...updates].sort((a, b) => a - b));
      expect(lines.some((line) => line.includes('"progress"'))).toBe(false);
    });
  });
});
