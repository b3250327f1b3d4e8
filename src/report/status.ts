import type { BudgetRow, CoverageRow, QueueRow, RunStatusRow } from '../sql/status.js';
import { terminalSafe as safe } from './terminal-safe.js';

export interface StatusReport {
  coverage: CoverageRow[];
  queue: QueueRow[];
  budgets: BudgetRow[];
  runs: RunStatusRow[];
}

const n = (x: number) => x.toLocaleString('en-US');

function duration(seconds: number): string {
  if (seconds < 90) return `${seconds} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

/**
 * The operator's view in plain text: coverage per model, the queue, latest
 * runs. Every string from the database goes through terminalSafe: a provider
 * label, host or error text holding escape sequences is shown, not obeyed.
 */
export function formatStatus(report: StatusReport): string {
  const lines: string[] = ['coverage (up to date / eligible, per provider/model):'];
  if (report.coverage.length === 0) lines.push('  nothing embedded yet: pgembed embed');
  for (const c of report.coverage) {
    const percent = c.eligible ? ((100 * c.upToDate) / c.eligible).toFixed(1) : '100.0';
    lines.push(
      `  ${safe(c.provider)}/${safe(c.model)}: ${n(c.upToDate)} / ${n(c.eligible)} (${percent}%), stale ${n(c.stale)}, missing ${n(c.missing)}${c.orphans ? `, orphans ${n(c.orphans)} (of deleted messages; a --reconcile run removes them)` : ''}`,
    );
  }
  if (report.queue.length > 0) {
    lines.push('', 'queue (pending changes, per provider/model):');
    for (const q of report.queue) {
      const lag = q.lagSeconds === null ? 'nothing pending' : `lag ${duration(q.lagSeconds)}`;
      const backoff = q.backingOff ? `, ${n(q.backingOff)} backing off` : '';
      const scan = q.backfilled ? '' : ', not scanned yet (the next run scans the source)';
      lines.push(
        `  ${safe(q.provider)}/${safe(q.model)}: ${n(q.pending)} pending (${n(q.claimed)} claimed${backoff}), ${lag}${scan}`,
      );
      if (q.lastError) lines.push(`    last error: ${safe(q.lastError)}`);
    }
  }
  if (report.budgets.length > 0) {
    lines.push('', 'spend budget (the latest run of each model that set one):');
    for (const b of report.budgets) {
      const left = Math.max(b.budgetTokens - b.spentTokens, 0);
      const against = b.perDay ? 'today (UTC), every run of the model' : `by run ${b.runId}`;
      lines.push(
        `  ${safe(b.provider)}/${safe(b.model)}: ${n(b.spentTokens)} of ${n(b.budgetTokens)} tokens billed ${against}, ${n(left)} left`,
      );
    }
  }
  lines.push('', 'runs (latest first):');
  if (report.runs.length === 0) lines.push('  none yet');
  for (const r of report.runs) {
    const rate = r.messagesPerSecond === null ? '' : `, ${r.messagesPerSecond} msg/s`;
    const live =
      r.status === 'running'
        ? `, ETA ${r.etaSeconds === null ? 'unknown' : duration(r.etaSeconds)}, heartbeat ${duration(r.heartbeatAgeSeconds)} ago`
        : '';
    lines.push(
      `  run ${r.runId} ${safe(r.status).padEnd(11)} ${safe(r.provider)}/${safe(r.model)}: embedded ${n(r.embedded)}, skipped ${n(r.skipped)} of ${n(r.planned)} (${r.percent}%)${rate}${live}; started ${safe(r.startedAt.slice(0, 19))} on ${safe(r.host)}`,
    );
    const reasons = Object.entries(r.skippedByReason);
    if (reasons.length > 0) {
      lines.push(
        `      skipped: ${reasons.map(([reason, count]) => `${safe(reason)} ${n(count)}`).join(', ')}`,
      );
    }
    if (r.error) lines.push(`      error: ${safe(r.error)}`);
  }
  return lines.join('\n');
}
