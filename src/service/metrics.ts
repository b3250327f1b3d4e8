import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { RequestRecord } from '../provider/observed.js';
import type { KeptCounts, PipelineLive, RunObserver } from '../worker/observer.js';

/** The queue's figures for the worker's target, read at each scrape. */
export interface QueueFigures {
  pending: number;
  /** Age of the oldest pending change, in seconds; 0 when nothing is pending. */
  lagSeconds: number;
}

// Request latency: a local server answers in milliseconds, a hosted one in
// 0.1–2 s, a retried 429 can take a minute.
const REQUEST_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
// A commit of 64 rows is 10–100 ms on PostgreSQL 15 here; lock waits go to seconds.
const COMMIT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/**
 * The worker's Prometheus metrics, in a registry of its own. Labelled by
 * provider and model only: never an id, a text or a secret. Counters move as
 * batches commit and requests end, so for one run they agree with its
 * embedding_runs row and embedding_batches; gauges are read at each scrape.
 */
export class WorkerMetrics implements RunObserver {
  readonly registry = new Registry();
  readonly #labels: { provider: string; model: string };
  #live: PipelineLive | undefined;

  readonly #embedded: Counter<'provider' | 'model'>;
  readonly #skipped: Counter<'provider' | 'model' | 'reason'>;
  readonly #truncated: Counter<'provider' | 'model'>;
  readonly #tokensBilled: Counter<'provider' | 'model'>;
  readonly #tokensKept: Counter<'provider' | 'model'>;
  readonly #requests: Counter<'provider' | 'model' | 'outcome'>;
  readonly #retries: Counter<'provider' | 'model'>;
  readonly #providerErrors: Counter<'provider' | 'model' | 'class'>;
  readonly #requestSeconds: Histogram<'provider' | 'model'>;
  readonly #commitSeconds: Histogram<'provider' | 'model'>;

  constructor(target: { provider: string; model: string }, readQueue: () => Promise<QueueFigures>) {
    this.#labels = { provider: target.provider, model: target.model };
    const registers = [this.registry];
    const targetLabels = ['provider', 'model'] as const;
    const counter = <L extends string>(name: string, help: string, labelNames: readonly L[]) =>
      new Counter<L>({ name, help, labelNames, registers });
    this.#embedded = counter(
      'pgembed_messages_embedded_total',
      'Messages whose embedding was committed.',
      targetLabels,
    );
    this.#skipped = counter(
      'pgembed_messages_skipped_total',
      'Messages recorded as skipped (embedding_skips), by reason.',
      [...targetLabels, 'reason'],
    );
    this.#truncated = counter(
      'pgembed_messages_truncated_total',
      'Messages embedded from their first --max-input-tokens tokens (--truncate).',
      targetLabels,
    );
    this.#tokensBilled = counter(
      'pgembed_tokens_billed_total',
      'Tokens of every request the provider answered, kept or not: what it bills.',
      targetLabels,
    );
    this.#tokensKept = counter(
      'pgembed_tokens_kept_total',
      'Tokens of the inputs whose embeddings were committed.',
      targetLabels,
    );
    this.#requests = counter(
      'pgembed_requests_total',
      'Requests to the provider, each attempt once, by outcome (ok, 429, 5xx, 4xx, network).',
      [...targetLabels, 'outcome'],
    );
    this.#retries = counter(
      'pgembed_retries_total',
      'Failed attempts tried again after a wait.',
      targetLabels,
    );
    this.#providerErrors = counter(
      'pgembed_provider_errors_total',
      'Failed requests by the class the worker gave them (provider_transient, provider_fatal, input_rejected, invalid_response).',
      [...targetLabels, 'class'],
    );
    this.#requestSeconds = new Histogram({
      name: 'pgembed_request_duration_seconds',
      help: 'Time from sending a request to its answer or failure.',
      labelNames: targetLabels,
      buckets: REQUEST_BUCKETS_S,
      registers,
    });
    this.#commitSeconds = new Histogram({
      name: 'pgembed_batch_commit_duration_seconds',
      help: "Time a batch's transaction took, retries included.",
      labelNames: targetLabels,
      buckets: COMMIT_BUCKETS_S,
      registers,
    });

    const labels = this.#labels;
    // One read of the queue serves both gauges of a scrape.
    let queueRead: Promise<QueueFigures> | undefined;
    const queue = () => {
      queueRead ??= readQueue().finally(() => {
        queueRead = undefined;
      });
      return queueRead;
    };
    // A gauge of the target read at each scrape.
    const gauge = (name: string, help: string, read: () => number | Promise<number>) =>
      new Gauge({
        name,
        help,
        labelNames: targetLabels,
        registers,
        async collect() {
          this.set(labels, await read());
        },
      });
    const live = () => this.#live;
    gauge(
      'pgembed_queue_pending_messages',
      'Messages waiting to be embedded for this target (the queue depth).',
      async () => (await queue()).pending,
    );
    gauge(
      'pgembed_queue_lag_seconds',
      'Age of the oldest change not yet embedded; 0 when none waits.',
      async () => (await queue()).lagSeconds,
    );
    gauge(
      'pgembed_batches_in_flight',
      'Batches claimed and not yet committed.',
      () => live()?.inFlight() ?? 0,
    );
    gauge(
      'pgembed_concurrency',
      'Batches allowed in flight now (--concurrency, halved on 429s and grown back).',
      () => live()?.concurrency() ?? 0,
    );
    new Gauge({
      name: 'pgembed_rate_budget_seconds',
      help: 'Seconds of sending at the full --max-rpm/--max-tpm the rate gate holds now (10 when full).',
      labelNames: [...targetLabels, 'limit'],
      registers,
      collect() {
        this.reset();
        const budget = live()?.rateBudgetSeconds();
        if (budget?.requests !== undefined)
          this.set({ ...labels, limit: 'requests' }, budget.requests);
        if (budget?.tokens !== undefined) this.set({ ...labels, limit: 'tokens' }, budget.tokens);
      },
    });
    // Shown at 0 from the first scrape, so a rate() over them starts at once.
    for (const c of [
      this.#embedded,
      this.#truncated,
      this.#tokensBilled,
      this.#tokensKept,
      this.#retries,
    ])
      c.inc(labels, 0);
    this.#requests.inc({ ...labels, outcome: 'ok' }, 0);
  }

  /** The pipeline's live figures (undefined between passes). */
  pipeline(live: PipelineLive | undefined): void {
    this.#live = live;
  }

  /** Whether the circuit breaker says the provider keeps failing. */
  providerFailing(): boolean {
    return this.#live?.providerFailing() ?? false;
  }

  committed(kept: KeptCounts, seconds: number): void {
    this.#embedded.inc(this.#labels, kept.embedded);
    this.#truncated.inc(this.#labels, kept.truncated);
    this.#tokensKept.inc(this.#labels, kept.tokens);
    for (const [reason, count] of kept.skippedByReason) {
      this.#skipped.inc({ ...this.#labels, reason }, count);
    }
    this.#commitSeconds.observe(this.#labels, seconds);
  }

  billed(tokens: number): void {
    this.#tokensBilled.inc(this.#labels, tokens);
  }

  retried(): void {
    this.#retries.inc(this.#labels);
  }

  /** A request ended (see provider/observed.ts). */
  request(record: RequestRecord): void {
    this.#requests.inc({ ...this.#labels, outcome: record.outcome });
    this.#requestSeconds.observe(this.#labels, record.seconds);
    if (record.errorClass) {
      this.#providerErrors.inc({ ...this.#labels, class: record.errorClass });
    }
  }
}
