# bench/plot.gp - backlog and drain rate over time for one drain (bench/bench.sh).
#   gnuplot -e "datafile='x.dat'; ratefile='x-rate.dat'; outfile='x.png'; subtitle='...'; machine='...'" bench/plot.gp
# Columns of datafile (tdrain-bench-refs watch, one row per sample): seconds,
# acknowledged, backlog, visible in the projections, drain rate.  ratefile
# (bench.sh) keeps one row per change of the acknowledged count: seconds, and
# the events acknowledged since the previous change divided by its duration;
# fsteps draws each such rate over the interval it was measured on.
if (!exists("datafile")) datafile = 'perf-drain.dat'
if (!exists("ratefile")) ratefile = 'perf-drain-rate.dat'
if (!exists("outfile")) outfile = 'perf-drain.png'
if (!exists("subtitle")) subtitle = ''
if (!exists("machine")) machine = ''
set terminal pngcairo size 1000,520 font ",10" noenhanced
set output outfile
set title "tdrain: draining a pre-loaded backlog\n" . subtitle . "\n" . machine
set xlabel "seconds since the replica started"
set ylabel "events"
set y2label "drain rate, events/s"
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:*]
set key outside bottom center horizontal
set grid
plot datafile using 1:3 with lines lw 2 title "backlog (in the FIFO)", \
     datafile using 1:($2 - $4) with lines lw 1 dt 2 title "acknowledged, not yet visible (fold lag)", \
     ratefile using 1:2 axes x1y2 with fsteps lw 1 title "drain rate (acknowledged)"
