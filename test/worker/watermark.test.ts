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
});
