# bench/plot.gp - backlog and drain rate over time for one drain (bench/bench.sh).
#   gnuplot -e "datafile='x.dat'; outfile='x.png'; subtitle='...'" bench/plot.gp
# Columns of the .dat (tdrain-bench-refs watch): seconds, acknowledged, backlog,
# visible in the projections, drain rate over the last 5 s.
if (!exists("datafile")) datafile = 'perf-drain.dat'
if (!exists("outfile")) outfile = 'perf-drain.png'
if (!exists("subtitle")) subtitle = ''
set terminal pngcairo size 1000,520 font ",10" noenhanced
set output outfile
set title "tdrain: draining a pre-loaded backlog\n" . subtitle
set xlabel "seconds since the replica started"
set ylabel "events"
set y2label "events/s (acknowledged, 5 s window)"
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:*]
set key outside bottom center horizontal
set grid
plot datafile using 1:3 with lines lw 2 title "backlog (in the FIFO)", \
     datafile using 1:($2 - $4) with lines lw 1 dt 2 title "acknowledged, not yet visible (fold lag)", \
     datafile using 1:5 axes x1y2 with steps lw 1 title "drain rate"
