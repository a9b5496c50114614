# Sourced by the device-session scripts: their stages share one deadline, TOTAL seconds from
# now (the script's default as $1), so a call under the device's 10-minute limit that runs
# out still ends each stage in time to write its results.
#   left     seconds left before the deadline
#   cap N    N seconds, or what is left if less (a stage's share)
deadline=$(( $(date +%s) + ${TOTAL:-${1:?deadline.sh takes the default TOTAL seconds}} ))
left() { echo $(( deadline - $(date +%s) )); }
cap() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }
