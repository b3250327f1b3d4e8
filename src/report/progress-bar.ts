import cliProgress from 'cli-progress';

/** What the run reports as it goes; a terminal bar, or nothing (the log lines then). */
export interface ProgressDisplay {
  start(total: number): void;
  update(done: number, detail: { embedded: number; skipped: number; ratePerSecond: number }): void;
  stop(): void;
}

/** A bar on stderr: done/total, percent, rate and ETA. For terminals only. */
export function terminalProgressBar(stream: NodeJS.WriteStream = process.stderr): ProgressDisplay {
  const bar = new cliProgress.SingleBar(
    {
      stream,
      format:
        'embedding {bar} {value}/{total} ({percentage}%) | {rate} msg/s | ETA {eta_formatted} | skipped {skipped}',
      hideCursor: true,
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
