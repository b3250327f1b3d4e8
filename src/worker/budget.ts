/**
 * The spend budget (--max-tokens, --max-cost-usd) in tokens billed. A
 * one-shot run counts its own; a watcher counts the UTC day's: its own since
 * the day began, and every other run of the model that started that day
 * (read from their rows at most every 5 s: one query, not one a batch).
 */
export class SpendBudget {
  #day: string | undefined;
  #billedAtDayStart = 0;
  #othersToday = 0;
  #othersReadAtMs = Number.NEGATIVE_INFINITY;

  constructor(
    readonly limitTokens: number,
    private readonly perDay: boolean,
    private readonly readOthersToday: () => Promise<number>,
    private readonly nowMs: () => number = Date.now,
  ) {}

  /** Tokens billed that count against the budget now. */
  async spent(billedByThisRun: number): Promise<number> {
    if (!this.perDay) return billedByThisRun;
    const now = this.nowMs();
    const day = new Date(now).toISOString().slice(0, 10);
    if (day !== this.#day) {
      this.#day = day;
      this.#billedAtDayStart = billedByThisRun;
      this.#othersReadAtMs = Number.NEGATIVE_INFINITY;
    }
    if (now - this.#othersReadAtMs >= OTHERS_READ_EVERY_MS) {
      this.#othersToday = await this.readOthersToday();
      this.#othersReadAtMs = now;
    }
    return billedByThisRun - this.#billedAtDayStart + this.#othersToday;
  }
}

const OTHERS_READ_EVERY_MS = 5_000;
