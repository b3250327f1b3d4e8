import cliProgress from 'cli-progress';

/** What the run reports as it goes; a terminal bar, or nothing (the log lines then). */
export interface ProgressDisplay {
  start(total: number): void;
  /** The total changed: a scan beside the run has queued more, or has ended. */
  setTotal(total: number): void;
  update(done: number, detail: { embedded: number; skipped: number; ratePerSecond: number }): void;
  /** Draws the last frame, ends its line, and never draws again. */
  stop(): void;
}

/**
 * A bar on stderr: done/total, percent, rate and ETA. For terminals only.
 *
 * Its owner stops it before writing anything else (the summary, an error, a
 * warning on a signal). Stopping draws the last frame where the cursor is and
 * ends the line there, so whatever is written next starts on a fresh line
 * below it. cli-progress would instead jump back to where the bar started
 * (it saves and restores the cursor): with lines written since, the next
 * lines then land on top of them, the bar's last frame left among them.
 */
export function terminalProgressBar(stream: NodeJS.WriteStream = process.stderr): ProgressDisplay {
  const bar = new cliProgress.SingleBar(
    {
      stream: withoutCursorJumps(stream),
      format:
        'embedding {bar} {value}/{total} ({percentage}%) | {rate} msg/s | ETA {eta_formatted} | skipped {skipped}',
      hideCursor: true,
      // Cut to the terminal's width rather than turning its line wrapping off:
      // a line another writer puts out while the bar is up stays whole.
      linewrap: true,
      // Each frame is drawn whole even when unchanged: a line written meanwhile
      // moved the cursor, and the last frame (on stop) goes where it now is.
      forceRedraw: true,
      // The run stops the bar on a signal, before anything is written.
      gracefulExit: false,
      // Redraw at most 5 times a second: the bar must not cost the run.
      fps: 5,
      etaBuffer: 50,
    },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    start(total) {
      started = true;
      bar.start(total, 0, { rate: '0.0', skipped: 0 });
    },
    setTotal(total) {
      if (started) bar.setTotal(total);
    },
    update(done, detail) {
      if (!started) return;
      bar.update(done, { rate: detail.ratePerSecond.toFixed(1), skipped: detail.skipped });
    },
    stop() {
      if (!started) return;
      started = false;
      bar.stop();
    },
  };
}

/** Save cursor (DECSC) and restore cursor (DECRC), as cli-progress writes them. */
const CURSOR_JUMPS = new Set(['\x1B7', '\x1B8']);

/** The stream as the bar sees it: everything goes through but the cursor save and restore. */
function withoutCursorJumps(stream: NodeJS.WriteStream): NodeJS.WriteStream {
  return new Proxy(stream, {
    get(target, property) {
      if (property === 'write') {
        return (chunk: unknown, ...rest: unknown[]) =>
          typeof chunk === 'string' && CURSOR_JUMPS.has(chunk)
            ? true
            : (target.write as (...args: unknown[]) => boolean)(chunk, ...rest);
      }
      const value = Reflect.get(target, property, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}
