/**
 * What a run tells whoever watches it (the Prometheus metrics of
 * src/service/metrics.ts), as it happens. The worker knows nothing of how it
 * is shown; without --metrics-port nobody listens (`unobserved`).
 */
export interface RunObserver {
  /** A batch committed: what it kept, and how long the commit took. */
  committed(kept: KeptCounts, seconds: number): void;
  /** The provider answered a request (HTTP 200), kept or not: what it bills. */
  billed(tokens: number): void;
  /** A failed attempt is tried again after a wait. */
  retried(): void;
  /** The pipeline's live figures, read when they are shown. */
  pipeline(live: PipelineLive | undefined): void;
}

/** What one batch's commit kept. */
export interface KeptCounts {
  embedded: number;
  truncated: number;
  tokens: number;
  skippedByReason: Map<string, number>;
}

export interface PipelineLive {
  /** Batches claimed and not yet committed. */
  inFlight(): number;
  /** Batches the pipeline lets be sent at once now (halved on 429s, grown back). */
  concurrency(): number;
  /** The circuit breaker is open: batches keep failing with nothing embedded. */
  providerFailing(): boolean;
  /** Seconds of sending at the full limit the rate gate holds now, per limit. */
  rateBudgetSeconds(): { requests: number | undefined; tokens: number | undefined };
}

export const unobserved: RunObserver = {
  committed: () => {},
  billed: () => {},
  retried: () => {},
  pipeline: () => {},
};
