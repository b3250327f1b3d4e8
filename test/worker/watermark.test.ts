import { describe, expect, it } from 'vitest';
import { CommitWatermark } from '../../src/worker/watermark.js';

describe('the commit watermark', () => {
  it('moves the cursor only through batches that have all committed, whatever order they finish in', () => {
    const w = new CommitWatermark();
    w.register(1, '8');
    w.register(2, '16');
    w.register(3, '24');
    w.commit(3);
    expect(w.cursor).toBeNull();
    w.commit(2);
    expect(w.cursor).toBeNull();
    w.commit(1);
    expect(w.cursor).toBe('24');
  });

  it('tells a committing batch the cursor it may write, counting batches already committed after it', () => {
    const w = new CommitWatermark();
    w.register(1, '8');
    w.register(2, '16');
    w.register(3, '24');
    expect(w.cursorWith(2)).toBeNull(); // batch 1 is still in flight
    w.commit(2);
    expect(w.cursorWith(1)).toBe('16');
  });

  it('stops at the end of a strict-mode prefix and before a batch that kept nothing', () => {
    const w = new CommitWatermark();
    w.register(1, '8');
    w.register(2, '16');
    expect(w.cursorWith(2, '13')).toBeNull();
    w.commit(2, '13');
    w.commit(1);
    expect(w.cursor).toBe('13');

    const none = new CommitWatermark();
    none.register(1, '8');
    none.register(2, '16');
    none.commit(1);
    none.commit(2, null);
    expect(none.cursor).toBe('8');
  });

  it('never moves past a strict-mode prefix, even over later batches that committed', () => {
    const w = new CommitWatermark();
    w.register(1, '8');
    w.register(2, '16');
    w.register(3, '24');
    w.commit(3); // a later batch finished first
    w.commit(2, '13'); // batch 2 kept only up to 13: the failing message is 14
    w.commit(1);
    expect(w.cursor).toBe('13');
    expect(w.complete).toBe(false);

    const none = new CommitWatermark('4');
    none.register(1, '8');
    none.register(2, '16');
    none.commit(2);
    none.commit(1, null); // nothing of batch 1 committed
    expect(none.cursor).toBe('4');
  });

  it('is complete only when every registered batch committed in full', () => {
    const w = new CommitWatermark('100');
    w.register(1, '108');
    w.register(2, '116');
    w.commit(2);
    expect(w.complete).toBe(false);
    w.commit(1);
    expect(w.complete).toBe(true);
    expect(w.cursor).toBe('116');
  });
});
