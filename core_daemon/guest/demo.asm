; ===========================================================================
; vmfront demo guest: a tiny x86 real-mode "operating system" on a raw disk.
;
; Purpose: give vmfront something to show that (a) boots in about a second
; under plain TCG emulation, (b) changes the screen continuously so display
; damage never stops, and (c) visibly reacts to keyboard input, so end-to-end
; tests can check the whole input -> guest -> display path with QMP
; `input-send-event` and `screendump`.
;
; Build:  nasm -f bin -o demo.img demo.asm
; Run:    qemu-system-x86_64 -nodefaults -machine pc -m 16 -device VGA \
;             -drive file=demo.img,format=raw,if=ide,snapshot=on
;
; Image layout: sector 1 is the boot sector that SeaBIOS loads at 0000:7C00;
; it loads the remaining sectors (the rest of this file, padded to whole
; 512-byte sectors) right behind itself at 0000:7E00 with int 13h and jumps
; there.  Everything runs with CS = DS = SS = 0 and no relocation, so a label's
; value is its linear address.
;
; ---------------------------------------------------------------------------
; Screen layout (all fields start at column 0; "row"/"col" are character
; cells).  Text mode 3 is 80x25 cells of 9x16 pixels (QEMU renders 720x400);
; VGA mode 13h is 320x200 pixels, drawn as 40x25 cells of 8x8 pixels.  Note
; that QEMU's VGA scans mode 13h out pixel- and line-doubled, exactly as the
; CRTC programming says, so its display (and QMP screendump) is 640x400 with
; each guest pixel a 2x2 block; either way row r starts at display y = 16*r.
;
;   row 0   title bar: "VMFRONT DEMO GUEST" on a blue bar across the row
;   row 2   "COUNTER nnnnn": 5 zero-padded decimal digits at cols 8-12; the
;           counter counts BIOS timer ticks (~18.2 Hz) since boot, mod 65536
;   row 4   "KEYS: " then the typed characters from col 6 on (74 of them fit
;           in text mode, 34 in mode 13h)
;   row 6-7 help lines (differ per mode)
;   mode 13h only: pixel rows 96-111 hold a 16x16 yellow square whose x is
;           (counter mod 38) * 8, so it sweeps across the screen every ~2 s
;
; Keys:  printable ASCII  appended to the KEYS line (when the line is full the
;                         next key clears it and starts over)
;        Backspace        erases the last character
;        Enter / Esc      clear the KEYS line
;        F2               toggle text mode 3 <-> VGA mode 13h; the typed text
;                         is kept (cut to the 34 characters that fit when
;                         entering mode 13h) and everything is redrawn
;        F3               toggle a 1920x1080x32 linear framebuffer (Bochs VBE
;                         "dispi" registers, QEMU's -device VGA) <-> text mode:
;                         the whole screen is a high-colour animation (moving
;                         gradients and an XOR texture, a quarter of the rows
;                         redrawn every timer tick, so the whole picture is new
;                         every 4 ticks and keys are read between quarters,
;                         like video) below a 64-pixel strip at the top
;                         that is repainted in a new solid colour on every
;                         printable key (keys are not echoed as text there)
;        F4               (text mode) toggle scrolling: every timer tick rows
;                         9-24 scroll up one line and a numbered line of text
;                         is printed at the bottom, like a terminal printing a
;                         log (each line's text starts at a different place in
;                         a sentence, so neighbouring rows differ as real text)
;
; The 1920x1080 frame lies above 1 MiB (its address is PCI BAR 0 of the VGA
; device, 1234:1111), so the routines that draw it run in 32-bit protected
; mode with flat segments: pm_call switches there with interrupts off, calls
; the routine, and comes back to real mode.  ("Unreal mode" would be shorter,
; but a 4 GiB FS limit does not survive SeaBIOS's own mode switches, nor KVM
; without unrestricted-guest support, which emulates real mode.)
;
; Video output does not go through the BIOS teletype: put_char writes text
; mode cells straight to B800:0000, and in mode 13h renders the BIOS 8x8 ROM
; font into A000:0000 itself.  That keeps one layout/drawing code path for both
; modes, allows a coloured background behind glyphs in mode 13h (the BIOS
; teletype always paints glyph backgrounds black), and writes only the cells
; that actually change, so QEMU sees minimal damage.
; ===========================================================================

        cpu     386
        bits    16
        org     0x7C00

; --- layout constants ------------------------------------------------------
MODE_TEXT       equ 0x03        ; BIOS video mode numbers, also kept in [mode]
MODE_VGA        equ 0x13
TEXT_COLS       equ 80
VGA_COLS        equ 40
VGA_WIDTH       equ 320         ; pixels per scan line in mode 13h

ROW_TITLE       equ 0
ROW_COUNTER     equ 2
ROW_KEYS        equ 4
ROW_HELP        equ 6
COL_DIGITS      equ 8           ; after "COUNTER "
COL_KEYTEXT     equ 6           ; after "KEYS: "
NUM_DIGITS      equ 5

ATTR_TITLE      equ 0x1F        ; bright white on blue
ATTR_LABEL      equ 0x07        ; light grey on "black"
ATTR_COUNTER    equ 0x0A        ; light green
ATTR_KEYS       equ 0x0F        ; bright white
ATTR_HELP       equ 0x03        ; cyan
ATTR_BLANK      equ 0x07

; Mode 13h: the default palette's first 16 entries are the CGA colours, so
; text attributes map directly to pixel colours.  A cell background of 0
; (black) is replaced by VGA_BG so the whole screen is visibly non-black.
VGA_BG          equ 0x08        ; dark grey (0x55,0x55,0x55)
BAR_COLOUR      equ 0x0E        ; yellow
BAR_Y           equ 96          ; top pixel row of the moving square
BAR_SIZE        equ 16          ; square is BAR_SIZE x BAR_SIZE pixels
BAR_STEPS       equ 38          ; positions 0..37, x = pos*8 (max 296+16 < 320)

KEYMAX_TEXT     equ TEXT_COLS - COL_KEYTEXT     ; 74
KEYMAX_VGA      equ VGA_COLS - COL_KEYTEXT      ; 34

BDA_TICKS       equ 0x046C      ; BIOS data area: timer ticks since midnight

SCAN_F2         equ 0x3C        ; int 16h scan codes of F2, F3, F4 (ASCII 0)
SCAN_F3         equ 0x3D
SCAN_F4         equ 0x3E

MODE_HD         equ 0xFF        ; not a BIOS mode: the Bochs VBE 1920x1080x32 LFB
HD_WIDTH        equ 1920
HD_HEIGHT       equ 1080
HD_STRIP        equ 64          ; rows of the key strip above the animation
HD_BAND         equ (HD_HEIGHT - HD_STRIP) / 4  ; rows redrawn per timer tick
ROW_SCROLL      equ 9           ; first row of the scrolling area (text mode)
ROW_LAST        equ 24
DISPI_INDEX     equ 0x01CE      ; Bochs VBE "dispi" registers: index, data
DISPI_DATA      equ 0x01CF
DISPI_XRES      equ 1
DISPI_YRES      equ 2
DISPI_BPP       equ 3
DISPI_ENABLE    equ 4
DISPI_ENABLED   equ 0x01
DISPI_LFB       equ 0x40
PCI_VGA_ID      equ 0x11111234  ; device 1111, vendor 1234 (QEMU's std VGA)

; ===========================================================================
; Stage 1: boot sector (loaded by the BIOS at 0000:7C00, DL = boot drive)
; ===========================================================================
boot:
        cli
        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     sp, 0x7C00              ; stack grows down below the boot sector
        jmp     0x0000:.flat            ; some BIOSes enter at 07C0:0000; make CS = 0
.flat:
        sti
        cld
        mov     [boot_drive], dl

        ; Read sectors 2..N of cylinder 0 / head 0 to 0000:7E00.  The image is
        ; only a few sectors long, so plain CHS addressing always suffices.
        mov     si, 3                   ; attempts
.read:
        mov     ax, 0x0200 | STAGE2_SECTORS     ; AH=02 read, AL=sector count
        mov     bx, stage2                      ; ES:BX = destination
        mov     cx, 0x0002                      ; CH=cylinder 0, CL=sector 2
        xor     dh, dh                          ; head 0
        mov     dl, [boot_drive]
        int     0x13
        jnc     .loaded
        xor     ah, ah                  ; reset the disk system and retry
        mov     dl, [boot_drive]
        int     0x13
        dec     si
        jnz     .read
        mov     si, msg_disk_error      ; give up: say so via BIOS teletype
.msg:
        lodsb
        test    al, al
        jz      .dead
        mov     ah, 0x0E
        mov     bx, 0x0007
        int     0x10
        jmp     .msg
.dead:
        hlt
        jmp     .dead
.loaded:
        jmp     main

boot_drive:     db 0
msg_disk_error: db "vmfront demo: disk read error", 0

        times   510 - ($ - $$) db 0
        dw      0xAA55                  ; boot signature checked by the BIOS

; ===========================================================================
; Stage 2: the demo proper (loaded at 0000:7E00)
; ===========================================================================
stage2:

main:
        ; Fetch the BIOS 8x8 ROM font (chars 00h-7Fh) for drawing in mode 13h:
        ; int 10h AX=1130h BH=03h returns it in ES:BP.
        push    es
        mov     ax, 0x1130
        mov     bh, 0x03
        int     0x10
        mov     [font_ptr], bp
        mov     [font_ptr + 2], es
        pop     es

        call    find_lfb
        mov     ax, [BDA_TICKS]         ; count ticks from now on
        mov     [last_tick], ax
        call    enter_text_mode

        ; Main loop: react to whatever happened, then sleep until the next
        ; interrupt.  `hlt` with IF=1 returns after the next IRQ: the timer
        ; (IRQ0, ~18.2 Hz) or the keyboard (IRQ1).  So the guest wakes at most
        ; ~18 times a second plus once per key, and QEMU (even under TCG)
        ; idles in between instead of spinning.  A key arriving between the
        ; poll and the hlt waits at most one timer tick (55 ms).
.loop:
        call    poll_timer
        call    poll_keyboard
        sti
        hlt
        jmp     .loop

; ---------------------------------------------------------------------------
; poll_timer: advance the counter by the number of BIOS ticks since the last
; call and redraw what depends on it (digits; the square in mode 13h).
; ---------------------------------------------------------------------------
poll_timer:
        mov     ax, [BDA_TICKS]         ; low word; a single read is atomic
        mov     bx, ax
        sub     ax, [last_tick]         ; elapsed ticks, correct across 16-bit wrap
        jz      .done
        mov     [last_tick], bx
        cmp     ax, 100                 ; the BIOS resets the count at midnight;
        jbe     .add                    ; treat such a jump as a single tick
        mov     ax, 1
.add:
        add     [counter], ax
        cmp     byte [mode], MODE_HD
        je      draw_hd                 ; tail call: a new animation frame
        call    draw_counter
        cmp     byte [mode], MODE_VGA
        jne     .text
        jmp     draw_bar                ; tail call
.text:
        cmp     byte [scrolling], 0
        jne     scroll_line             ; tail call
.done:
        ret

; ---------------------------------------------------------------------------
; poll_keyboard: drain the BIOS keyboard buffer (int 16h) and handle each key.
; ---------------------------------------------------------------------------
poll_keyboard:
        mov     ah, 0x01                ; key available?  ZF=1 if not
        int     0x16
        jz      .done
        xor     ah, ah                  ; read it: AH = scan code, AL = ASCII
        int     0x16
        call    handle_key
        jmp     poll_keyboard
.done:
        ret

; handle_key: AH = scan code, AL = ASCII (0 for function keys).
handle_key:
        test    al, al
        jnz     .ascii
        cmp     ah, SCAN_F2
        je      toggle_mode             ; tail call
        cmp     ah, SCAN_F3
        je      toggle_hd               ; tail call
        cmp     ah, SCAN_F4
        jne     .ignore
        xor     byte [scrolling], 1
        ret
.ascii:
        cmp     byte [mode], MODE_HD    ; 1920x1080: a key repaints the strip
        jne     .text_key
        inc     byte [hd_keys]
        jmp     fill_strip              ; tail call
.text_key:
        cmp     al, 0x08                ; Backspace
        je      .backspace
        cmp     al, 0x0D                ; Enter
        je      clear_keys
        cmp     al, 0x1B                ; Esc
        je      clear_keys
        cmp     al, 0x20                ; only printable ASCII is echoed
        jb      .ignore
        cmp     al, 0x7E
        ja      .ignore

        mov     cl, [keylen]
        cmp     cl, [keymax]
        jb      .append
        push    ax                      ; line full: clear it, start over
        call    clear_keys
        pop     ax
.append:
        movzx   bx, byte [keylen]
        mov     [keybuf + bx], al
        inc     byte [keylen]
        mov     dl, bl                  ; draw just the new character
        add     dl, COL_KEYTEXT
        mov     dh, ROW_KEYS
        mov     bl, ATTR_KEYS
        jmp     put_char                ; tail call

.backspace:
        cmp     byte [keylen], 0
        je      .ignore
        dec     byte [keylen]
        mov     dl, [keylen]            ; blank the cell of the erased char
        add     dl, COL_KEYTEXT
        mov     dh, ROW_KEYS
        mov     al, ' '
        mov     bl, ATTR_BLANK
        jmp     put_char                ; tail call
.ignore:
        ret

; clear_keys: empty the typed text and blank its part of the KEYS row.
clear_keys:
        mov     byte [keylen], 0
        mov     dh, ROW_KEYS
        mov     dl, COL_KEYTEXT
        movzx   cx, byte [keymax]
        mov     al, ' '
        mov     bl, ATTR_BLANK
        jmp     fill_cells              ; tail call

; ---------------------------------------------------------------------------
; Mode switching and full redraws
; ---------------------------------------------------------------------------
toggle_hd:
        cmp     byte [mode], MODE_HD
        je      enter_text_mode
        cmp     dword [lfb], 0          ; no std VGA found: stay where we are
        je      .done
        mov     byte [mode], MODE_HD
        mov     bx, DISPI_ENABLE
        xor     ax, ax
        call    dispi_write
        mov     bx, DISPI_XRES
        mov     ax, HD_WIDTH
        call    dispi_write
        mov     bx, DISPI_YRES
        mov     ax, HD_HEIGHT
        call    dispi_write
        mov     bx, DISPI_BPP
        mov     ax, 32
        call    dispi_write
        mov     bx, DISPI_ENABLE
        mov     ax, DISPI_ENABLED | DISPI_LFB
        call    dispi_write
        call    fill_strip
        mov     cx, 4                   ; the whole picture at once
.band:
        call    draw_hd
        loop    .band
.done:
        ret

toggle_mode:
        cmp     byte [mode], MODE_VGA
        je      enter_text_mode
        ; fall through

enter_vga_mode:
        call    dispi_off
        mov     ax, 0x0000 | MODE_VGA   ; AH=00 set mode 13h (clears to black)
        int     0x10
        mov     byte [mode], MODE_VGA
        mov     byte [keymax], KEYMAX_VGA
        mov     al, [keylen]            ; keep the typed text if it fits
        cmp     al, KEYMAX_VGA
        jbe     .fits
        mov     byte [keylen], KEYMAX_VGA
.fits:
        push    es                      ; fill all 64000 pixels with VGA_BG
        mov     ax, 0xA000
        mov     es, ax
        xor     di, di
        mov     ax, VGA_BG * 0x0101
        mov     cx, 320 * 200 / 2
        rep     stosw
        pop     es
        mov     word [bar_x], 0xFFFF    ; no square drawn yet
        mov     word [help_ptr], help_vga
        mov     byte [cols], VGA_COLS
        jmp     redraw_all

enter_text_mode:
        call    dispi_off
        mov     ax, 0x0000 | MODE_TEXT  ; AH=00 set mode 3 (clears to grey spaces)
        int     0x10
        mov     ah, 0x01                ; hide the cursor (CH bit 5): a blinking
        mov     cx, 0x2000              ; cursor would make screendumps flicker
        int     0x10
        mov     byte [mode], MODE_TEXT
        mov     byte [keymax], KEYMAX_TEXT
        mov     word [help_ptr], help_text
        mov     byte [cols], TEXT_COLS
        ; fall through

; redraw_all: draw every field from scratch in the current mode.
redraw_all:
        mov     dh, ROW_TITLE           ; title bar across the whole row
        xor     dl, dl
        movzx   cx, byte [cols]
        mov     al, ' '
        mov     bl, ATTR_TITLE
        call    fill_cells
        mov     dh, ROW_TITLE
        xor     dl, dl
        mov     si, str_title
        call    put_string

        mov     dh, ROW_COUNTER
        xor     dl, dl
        mov     bl, ATTR_LABEL
        mov     si, str_counter
        call    put_string
        mov     di, shown_digits        ; forget what is on screen so that
        mov     cx, NUM_DIGITS          ; draw_counter paints all digits
        mov     al, 0xFF
        rep     stosb
        call    draw_counter

        mov     dh, ROW_KEYS
        xor     dl, dl
        mov     bl, ATTR_LABEL
        mov     si, str_keys
        call    put_string
        mov     si, keybuf              ; the typed text so far
        movzx   cx, byte [keylen]
        mov     bl, ATTR_KEYS
        jcxz    .keys_done
.key:
        lodsb
        call    put_char
        loop    .key
.keys_done:

        mov     si, [help_ptr]          ; help: consecutive 0-terminated lines,
        mov     dh, ROW_HELP            ; an empty string ends the list
        mov     bl, ATTR_HELP
.help:
        cmp     byte [si], 0
        je      .help_done
        xor     dl, dl
        call    put_string
        inc     dh
        jmp     .help
.help_done:

        cmp     byte [mode], MODE_VGA
        jne     .done
        call    draw_bar
.done:
        ret

; ---------------------------------------------------------------------------
; draw_counter: show [counter] as 5 decimal digits, touching only the digit
; cells whose value changed since the last call (shown_digits remembers them).
; ---------------------------------------------------------------------------
draw_counter:
        mov     ax, [counter]
        mov     di, digits + NUM_DIGITS - 1
        call    to_decimal

        xor     si, si                  ; SI = digit index 0..4
.cell:
        mov     al, [digits + si]
        cmp     al, [shown_digits + si]
        je      .next
        mov     [shown_digits + si], al
        mov     dx, si
        add     dl, COL_DIGITS
        mov     dh, ROW_COUNTER
        mov     bl, ATTR_COUNTER
        call    put_char
.next:
        inc     si
        cmp     si, NUM_DIGITS
        jb      .cell
        ret

; to_decimal: AX as NUM_DIGITS decimal digits ending at DI (the last digit).
to_decimal:
        mov     bx, 10
        mov     cx, NUM_DIGITS
.digit:                                 ; least significant digit first
        xor     dx, dx
        div     bx
        add     dl, '0'
        mov     [di], dl
        dec     di
        loop    .digit
        ret

; ---------------------------------------------------------------------------
; draw_bar (mode 13h only): move the square to x = (counter mod 38) * 8,
; erasing it at its old position first.  Nothing is drawn if it did not move.
; ---------------------------------------------------------------------------
draw_bar:
        mov     ax, [counter]
        xor     dx, dx
        mov     bx, BAR_STEPS
        div     bx
        mov     ax, dx
        shl     ax, 3                   ; new x
        cmp     ax, [bar_x]
        je      .done
        push    ax
        mov     bx, [bar_x]
        cmp     bx, 0xFFFF              ; nothing to erase after a mode switch
        je      .draw
        mov     al, VGA_BG
        call    fill_bar
.draw:
        pop     bx
        mov     [bar_x], bx
        mov     al, BAR_COLOUR
        call    fill_bar
.done:
        ret

; fill_bar: paint the BAR_SIZE x BAR_SIZE square at x = BX, y = BAR_Y in colour AL.
fill_bar:
        push    es
        mov     cx, 0xA000
        mov     es, cx
        lea     di, [bx + BAR_Y * VGA_WIDTH]
        mov     dx, BAR_SIZE
.line:
        mov     cx, BAR_SIZE
        rep     stosb
        add     di, VGA_WIDTH - BAR_SIZE
        dec     dx
        jnz     .line
        pop     es
        ret

; ---------------------------------------------------------------------------
; Character-cell drawing primitives, the same for both video modes.
; ---------------------------------------------------------------------------

; put_string: draw the 0-terminated string at DS:SI at row DH from column DL
; in attribute BL.  Returns SI past the terminator, DL past the last cell.
put_string:
        lodsb
        test    al, al
        jz      .done
        call    put_char
        jmp     put_string
.done:
        ret

; fill_cells: draw character AL with attribute BL into CX cells of row DH from
; column DL on.  Returns DL past the last cell.
fill_cells:
        jcxz    .done
.cell:
        call    put_char
        loop    .cell
.done:
        ret

; put_char: draw character AL with attribute BL (background<<4 | foreground)
; in the cell at row DH, column DL, then advance DL to the next column.
; Preserves every other register.
put_char:
        push    ax
        push    bx
        push    cx
        push    si
        push    di
        push    es
        cmp     byte [mode], MODE_HD    ; no text in the 1920x1080 animation
        je      .out
        cmp     byte [mode], MODE_VGA
        je      .vga

        ; Text mode: cell word (char, attribute) at B800:(row*80 + col)*2.
        mov     cx, 0xB800
        mov     es, cx
        mov     ch, al                  ; keep the character
        mov     al, dh
        mov     ah, TEXT_COLS
        mul     ah                      ; AX = row*80 (8-bit MUL leaves DX alone)
        movzx   di, dl
        add     di, ax
        shl     di, 1
        mov     al, ch
        mov     ah, bl
        stosw
        jmp     .out

.vga:
        ; Mode 13h: 8x8 pixels at A000:(row*8*320 + col*8), rendered from the
        ; BIOS ROM font: one byte per pixel row, most significant bit leftmost.
        movzx   si, al                  ; SI = font offset of the glyph
        shl     si, 3
        add     si, [font_ptr]
        xor     ax, ax                  ; DI = row*2560 = (row*256)*10
        mov     ah, dh
        mov     di, ax
        shl     di, 2
        add     di, ax
        shl     di, 1
        movzx   ax, dl                  ; + col*8
        shl     ax, 3
        add     di, ax
        mov     ah, bl                  ; AH = foreground colour
        and     ah, 0x0F
        shr     bl, 4                   ; BL = background colour, black -> VGA_BG
        jnz     .bg_ok
        mov     bl, VGA_BG
.bg_ok:
        mov     cx, 0xA000
        mov     es, cx
        push    ds
        mov     ds, [font_ptr + 2]      ; (read with DS=0 before it changes)
        mov     ch, 8                   ; 8 pixel rows
.row:
        lodsb
        mov     bh, al                  ; BH = this row's bitmap
        mov     cl, 8                   ; 8 pixels
.pixel:
        mov     al, bl
        shl     bh, 1
        jnc     .put
        mov     al, ah
.put:
        stosb
        dec     cl
        jnz     .pixel
        add     di, VGA_WIDTH - 8
        dec     ch
        jnz     .row
        pop     ds

.out:
        pop     es
        pop     di
        pop     si
        pop     cx
        pop     bx
        pop     ax
        inc     dl
        ret

; ---------------------------------------------------------------------------
; The 1920x1080x32 animation and the scrolling text
; ---------------------------------------------------------------------------

; pm_call: call the 32-bit routine at BX in flat protected mode (interrupts
; off meanwhile), then return to real mode with CS = DS = ES = SS = 0.
pm_call:
        pushad
        cli
        movzx   ebx, bx
        mov     [pm_target], ebx
        movzx   esp, sp                 ; the same stack, addressed with ESP
        lgdt    [gdt_desc]
        mov     eax, cr0
        or      al, 1
        mov     cr0, eax
        jmp     dword SEL_CODE32:.pm32
        bits    32
.pm32:
        mov     ax, SEL_DATA32
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        call    [pm_target]
        jmp     SEL_CODE16:.pm16
        bits    16
.pm16:
        mov     ax, SEL_DATA16          ; 64 KiB limits again before real mode
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     fs, ax
        mov     gs, ax
        mov     eax, cr0
        and     al, 0xFE
        mov     cr0, eax
        jmp     0x0000:.rm
.rm:
        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     fs, ax
        mov     gs, ax
        sti
        popad
        ret

; find_lfb: [lfb] = PCI BAR 0 of the first 1234:1111 device on bus 0, or 0.
find_lfb:
        mov     ecx, 0x80000000         ; config address: enable, bus 0, device 0
.scan:
        mov     eax, ecx
        mov     dx, 0x0CF8
        out     dx, eax
        mov     dx, 0x0CFC
        in      eax, dx
        cmp     eax, PCI_VGA_ID
        je      .found
        add     ecx, 0x800              ; next device
        cmp     ecx, 0x80010000
        jb      .scan
        ret
.found:
        lea     eax, [ecx + 0x10]       ; BAR 0
        mov     dx, 0x0CF8
        out     dx, eax
        mov     dx, 0x0CFC
        in      eax, dx
        and     eax, 0xFFFFFFF0
        mov     [lfb], eax
        ret

; dispi_write: Bochs VBE register BX = AX.
dispi_write:
        push    dx
        xchg    ax, bx
        mov     dx, DISPI_INDEX
        out     dx, ax
        xchg    ax, bx
        mov     dx, DISPI_DATA
        out     dx, ax
        pop     dx
        ret

; dispi_off: leave the Bochs VBE mode (before a BIOS mode set).
dispi_off:
        cmp     byte [mode], MODE_HD
        jne     .done
        mov     bx, DISPI_ENABLE
        xor     ax, ax
        call    dispi_write
.done:
        ret

draw_hd:
        push    bx
        mov     bx, draw_band32
        call    pm_call
        pop     bx
        ret

fill_strip:
        push    bx
        mov     bx, fill_strip32
        call    pm_call
        pop     bx
        ret

        bits    32
; draw_band32: the next quarter of the animation's rows ([hd_band] 0-3) at
; t = [counter]: for pixel (x, y), blue = x + t, green = y + 2t,
; red = ((x xor y) >> 2) + t (each mod 256), so every 64x64 tile holds
; thousands of colours and every frame changes them all.
draw_band32:
        movzx   esi, word [counter]     ; t
        movzx   eax, byte [hd_band]
        inc     byte [hd_band]
        and     byte [hd_band], 3
        imul    edx, eax, HD_BAND
        add     edx, HD_STRIP           ; y = first row of the band
        lea     ebx, [edx + HD_BAND]
        mov     [hd_end], ebx
        imul    edi, edx, HD_WIDTH * 4
        add     edi, [lfb]
.row:
        lea     ebp, [edx + esi * 2]    ; green byte for this row
        and     ebp, 0xFF
        shl     ebp, 8
        xor     ebx, ebx                ; x
        mov     ecx, HD_WIDTH
.pixel:
        mov     eax, ebx
        xor     eax, edx
        shr     eax, 2
        add     eax, esi
        shl     eax, 16                 ; red in bits 16-23
        mov     ax, bx
        add     ax, si                  ; blue in bits 0-7
        and     eax, 0x00FF00FF
        or      eax, ebp
        stosd
        inc     ebx
        dec     ecx
        jnz     .pixel
        inc     edx
        cmp     edx, [hd_end]
        jb      .row
        ret

; fill_strip32: the top HD_STRIP rows in colour [hd_keys] * 0x2B4F71.
fill_strip32:
        movzx   eax, byte [hd_keys]
        imul    eax, eax, 0x2B4F71
        and     eax, 0x00FFFFFF
        mov     edi, [lfb]
        mov     ecx, HD_STRIP * HD_WIDTH
        rep     stosd
        ret
        bits    16

; scroll_line: rows ROW_SCROLL..24 up one line (BIOS scroll), then print
; "line NNNNN: ..." on row 24 with the next line number.
scroll_line:
        mov     ax, 0x0601              ; AH=06 scroll up, AL=1 line
        mov     bh, ATTR_LABEL          ; attribute of the blank line
        mov     cx, ROW_SCROLL << 8     ; upper left: row, column 0
        mov     dx, (ROW_LAST << 8) | (TEXT_COLS - 1)
        int     0x10
        inc     word [line_no]
        mov     ax, [line_no]
        mov     di, line_digits + NUM_DIGITS - 1
        call    to_decimal
        mov     dh, ROW_LAST
        xor     dl, dl
        mov     bl, ATTR_LABEL
        mov     si, str_line
        call    put_string
        mov     si, line_digits
        call    put_string
        mov     si, str_colon
        call    put_string
        mov     ax, [line_no]           ; the text from offset line*7 mod its length
        imul    ax, ax, 7
        xor     dx, dx
        mov     cx, FILLER_LEN
        div     cx
        mov     si, str_filler
        add     si, dx
        mov     dh, ROW_LAST
        mov     dl, 12                  ; after "line NNNNN: "
        mov     cx, TEXT_COLS - 12 - 8
.text:
        lodsb
        call    put_char
        loop    .text
        ret

; ===========================================================================
; Data
; ===========================================================================
str_title:      db "VMFRONT DEMO GUEST", 0
str_counter:    db "COUNTER ", 0
str_keys:       db "KEYS: ", 0

; Help lines per mode: consecutive 0-terminated strings, then an empty one.
help_text:      db "F2: VGA mode 13h (320x200)  F3: 1920x1080 animation  F4: scrolling text", 0
                db "Type to echo keys.  Backspace: erase.  Enter/Esc: clear.", 0
                db 0
help_vga:       db "F2: back to text mode 3 (80x25)", 0
                db "Backspace: erase. Enter/Esc: clear.", 0
                db 0

mode:           db MODE_TEXT    ; current BIOS video mode (MODE_TEXT/MODE_VGA)
cols:           db TEXT_COLS    ; character columns in the current mode
keymax:         db KEYMAX_TEXT  ; typed characters that fit in the current mode
keylen:         db 0            ; characters in keybuf
help_ptr:       dw help_text
counter:        dw 0            ; ticks counted since boot (wraps at 65536)
last_tick:      dw 0            ; BDA tick count seen by the last poll_timer
bar_x:          dw 0xFFFF       ; x of the square on screen, 0xFFFF = none
font_ptr:       dd 0            ; far pointer (offset, segment) to 8x8 font
digits:         times NUM_DIGITS db '0'         ; counter as decimal text
shown_digits:   times NUM_DIGITS db 0xFF        ; digits currently on screen
keybuf:         times KEYMAX_TEXT db 0          ; the typed characters
scrolling:      db 0            ; 1 while F4 scrolling is on
line_no:        dw 0            ; number of the last printed scrolling line
line_digits:    times NUM_DIGITS db '0'
                db 0
str_line:       db "line ", 0
str_colon:      db ": ", 0
str_filler:     db "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
FILLER_LEN      equ $ - str_filler
                db "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
lfb:            dd 0            ; linear framebuffer address (0: none found)
hd_keys:        db 0            ; printable keys typed in the 1920x1080 mode
hd_band:        db 0            ; the quarter of the animation drawn next
hd_end:         dd 0            ; row after the band being drawn
pm_target:      dd 0            ; the 32-bit routine pm_call runs
SEL_CODE32      equ 0x08
SEL_DATA32      equ 0x10
SEL_CODE16      equ 0x18
SEL_DATA16      equ 0x20
gdt:            dq 0                            ; null descriptor
                dq 0x00CF9A000000FFFF           ; 0x08: code, 32-bit, base 0, 4 GiB
                dq 0x00CF92000000FFFF           ; 0x10: data, 32-bit, base 0, 4 GiB
                dq 0x00009A000000FFFF           ; 0x18: code, 16-bit, base 0, 64 KiB
                dq 0x000092000000FFFF           ; 0x20: data, 16-bit, base 0, 64 KiB
gdt_desc:       dw gdt_desc - gdt - 1
                dd gdt

; Pad to whole sectors: the boot sector reads exactly STAGE2_SECTORS sectors.
        times   (512 - ($ - $$) % 512) % 512 db 0
image_end:
STAGE2_SECTORS  equ (image_end - stage2) / 512

; Build-time checks (a negative TIMES count is an assembly error): stage 2
; must exist and fit in the 62 sectors after the boot sector on track 0.
        times   -(STAGE2_SECTORS < 1) db 0
        times   -(STAGE2_SECTORS > 62) db 0
