cat /opt/tool/greeting.txt > /out/greeting.txt
echo "at run time: $GREETING" >> /out/greeting.txt
